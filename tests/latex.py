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
