"""Compile a generated table inside a minimal booktabs document (skipped where pdflatex is absent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def assert_compiles(table_tex: str, workdir: Path) -> None:
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended)")
    doc = workdir / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + table_tex + "\n\\end{document}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (workdir / "doc.pdf").is_file()


def body_rows(table_tex: str) -> dict[str, list[str]]:
    """The table's body (between \\midrule and \\bottomrule): row label -> its cells, as written."""
    body = table_tex.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    rows = {}
    for line in body.strip().splitlines():
        label, *cells = (c.strip() for c in line.strip().removesuffix("\\\\").split("&"))
        rows[label] = cells
    return rows


def bold_cells(table_tex: str) -> set[tuple[str, int]]:
    """(row label, column index) of every cell set in bold."""
    return {
        (label, col)
        for label, cells in body_rows(table_tex).items()
        for col, cell in enumerate(cells)
        if cell.startswith("\\textbf{")
    }


def assert_bold_is(table_tex: str, expected: dict[int, set[str]]) -> None:
    """Exactly one bold cell in each column of ``expected``, in one of the rows given for it, and no
    bold cell elsewhere."""
    bold = bold_cells(table_tex)
    for col, rows in expected.items():
        in_col = {label for label, c in bold if c == col}
        assert len(in_col) == 1 and in_col <= rows, (
            f"column {col}: bold {sorted(in_col)}, expected one of {sorted(rows)}"
        )
    assert {c for _, c in bold} <= set(expected), f"bold outside the expected columns: {sorted(bold)}"


def classic_manifest(seeds: list[int]) -> dict:
    """The manifest fields a Protocol B table's caption reads, for tables built from constructed rows."""
    return {
        "config": {
            "name": "syn",
            "seeds": seeds,
            "forget": {"fraction": 0.1},
            "dataset": "fm",
            "model": {"name": "r"},
            "selection": {"rule": "floor", "floor": 0.95},
            "bn": "keep",
        }
    }
