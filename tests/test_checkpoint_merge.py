"""``negmerge-bench merge`` on real Hugging Face checkpoints built offline (random tiny Llama and GPT-2,
bf16, sharded), on single safetensors files and on PyTorch state dicts: the output loads with
transformers and equals theta_0 - lam * (the merge computed in memory from its definition), bit for
bit (every step is one IEEE float32 operation in a fixed order, so this is exact by construction)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.cli import main

transformers = pytest.importorskip("transformers")

K = 5
LAM = 0.75


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


def _sweep(root: Path, build, seed: int) -> tuple[Path, list[Path]]:
    """theta_0 and K fine-tuned-looking candidates (theta_0 plus seeded noise), bf16, >= 3 shards each."""
    torch.manual_seed(seed)
    model = build().to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "theta0", max_shard_size="20KB")
    paths = []
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(K):
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = 0.02 * torch.randn(p.shape, generator=gen) + 0.005 * (i - 2)
                p.copy_((base[name].float() + noise).to(p.dtype))
        model.save_pretrained(root / f"cand{i}", max_shard_size="20KB")
        paths.append(root / f"cand{i}")
    return root / "theta0", paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# -- the merges from their definitions, in float32, one operation at a time --------------------------
def _seq_sum(ts: list[torch.Tensor]) -> torch.Tensor:
    total = ts[0].clone()
    for t in ts[1:]:
        total = total + t
    return total


def ref_negmerge(taus: list[torch.Tensor]) -> torch.Tensor:
    stack = torch.stack(taus)
    keep = (stack > 0).all(0) | (stack < 0).all(0)
    return torch.where(keep, _seq_sum(taus) / torch.tensor(float(len(taus))), torch.zeros(()))


def ref_magmax(taus: list[torch.Tensor]) -> torch.Tensor:
    best = taus[0].clone()
    for t in taus[1:]:
        best = torch.where(t.abs() >= best.abs(), t, best)
    return best


def ref_ties(taus: list[torch.Tensor], k: float = 0.2) -> torch.Tensor:
    n = taus[0].numel()
    keep = max(1, math.ceil(round(k * n, 9)))
    trimmed = []
    for t in taus:
        cut = torch.sort(t.abs(), descending=True).values[keep - 1] if keep < n else 0.0
        trimmed.append(torch.where((t.abs() >= cut) & (t != 0), t, torch.zeros(())))
    zero = torch.zeros(())
    pos = _seq_sum([torch.where(t > 0, t, zero) for t in trimmed])
    neg = _seq_sum([torch.where(t < 0, t, zero) for t in trimmed])
    n_pos = sum((t > 0).int() for t in trimmed).clamp(min=1).float()
    n_neg = sum((t < 0).int() for t in trimmed).clamp(min=1).float()
    mass = pos + neg
    up, down = mass > 0, mass < 0
    majority = int(up.sum()) - int(down.sum())
    out = torch.where(up, pos / n_pos, torch.where(down, neg / n_neg, zero))
    voted = ~(up | down) & (sum((t != 0).int() for t in trimmed) > 0)
    if majority:
        out = torch.where(voted, pos / n_pos if majority > 0 else neg / n_neg, out)
    return out


REFS = {"negmerge": ref_negmerge, "magmax": ref_magmax, "ties": ref_ties}


def expected_output(base: dict, cands: list[dict], method: str, lam: float) -> dict[str, torch.Tensor]:
    """theta_0 - lam * merge(theta_i - theta_0), merged over the whole vector (TIES's cut is global)."""
    keys = [k for k in base if base[k].is_floating_point()]
    flat = lambda sd: torch.cat([sd[k].float().reshape(-1) for k in keys])  # noqa: E731
    merged = REFS[method]([flat(c) - flat(base) for c in cands])
    out, start = dict(base), 0
    for k in keys:
        n = base[k].numel()
        m = merged[start : start + n].view(base[k].shape)
        out[k] = (base[k].float() + (-lam) * m).to(base[k].dtype)
        start += n
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_sweep(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base, cands = _sweep(root, {"llama": _llama, "gpt2": _gpt2}[request.param], seed=len(request.param))
    return base, cands


@pytest.mark.parametrize("method", ["negmerge", "ties", "magmax"])
def test_merge_cli_on_sharded_hf_checkpoints_equals_the_definition(hf_sweep, method, tmp_path):
    base, cands = hf_sweep
    out = tmp_path / "merged"
    # the candidates as a glob: the sweep folder also holds theta0, which is left out
    rc = main(["merge", "--base", str(base), "--candidates", str(base.parent / "cand*"), "--method", method,
               "--lam", str(LAM), "--out", str(out)])  # fmt: skip
    assert rc == 0
    base_sd = _tensors(base)
    expected = expected_output(base_sd, [_tensors(c) for c in cands], method, LAM)
    got = _tensors(out)
    assert list(sorted(got)) == sorted(base_sd)
    for key, value in expected.items():
        assert got[key].dtype == torch.bfloat16 == base_sd[key].dtype, key
        assert torch.equal(got[key], value), f"{method}: {key} differs from the definition"
    assert any(not torch.equal(got[k], base_sd[k]) for k in got)  # the merge moved something

    # the same sharding as the input, and a valid index
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert len(set(index["weight_map"].values())) >= 3
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert key in f.keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert (out / "generation_config.json").is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key

    sidecar = json.loads((out / "merge.json").read_text())
    assert sidecar["method"] == method and sidecar["lam"] == LAM
    assert [Path(c["path"]).name for c in sidecar["candidates"]] == [c.name for c in cands]
    assert all(len(f["sha256"]) == 64 for c in sidecar["candidates"] for f in c["files"])
    assert 0 < sidecar["consensus_rate"]["overall"] <= 1
    assert set(sidecar["consensus_rate"]["per_tensor"]) == set(base_sd)
    assert sidecar["git"]["commit"] is not None


def test_vector_only_writes_the_merged_vector_in_each_tensors_dtype(hf_sweep, tmp_path):
    base, cands = hf_sweep
    out = tmp_path / "vector"
    assert main(["merge", "--base", str(base), "--candidates", *map(str, cands), "--method", "negmerge",
                 "--vector-only", "--out", str(out)]) == 0  # fmt: skip
    base_sd = _tensors(base)
    keys = list(base_sd)
    flat = lambda sd: torch.cat([sd[k].float().reshape(-1) for k in keys])  # noqa: E731
    merged = ref_negmerge([flat(_tensors(c)) - flat(base_sd) for c in cands])
    got, start = _tensors(out), 0
    for k in keys:
        n = base_sd[k].numel()
        assert torch.equal(got[k], merged[start : start + n].view(base_sd[k].shape).to(torch.bfloat16)), k
        start += n
    rate = json.loads((out / "merge.json").read_text())["consensus_rate"]["overall"]
    assert rate == pytest.approx(float((merged != 0).float().mean()))


def test_recipe_in_mergekit_shape_gives_the_same_model_as_the_flags(hf_sweep, tmp_path):
    base, cands = hf_sweep
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n" + "".join(f"  - model: {c}\n" for c in cands) + "parameters:\n  k: 0.3\n  lambda: 0.5\n"
    )
    assert main(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "a")]) == 0
    assert main(["merge", "--base", str(base), "--candidates", *map(str, cands), "--method", "ties",
                 "--set", "k=0.3", "--lam", "0.5", "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "a" / "merge.json").read_text())["params"] == {"k": 0.3, "scope": "global"}


# -- single files, state dicts, non-float tensors, --include/--exclude, refusals ----------------------
def _single_files(tmp_path: Path, dtype=torch.float16) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(3)
    base = {
        "enc.w": torch.randn(300, 7, generator=gen).to(dtype),
        "enc.b": torch.randn(7, generator=gen).to(dtype),
        "head.w": torch.randn(5, 7, generator=gen).to(dtype),
        "position_ids": torch.arange(11),
    }
    save_file(base, tmp_path / "theta0.safetensors")
    paths = []
    for i in range(4):
        cand = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) if v.is_floating_point()
                else v + i for k, v in base.items()}  # fmt: skip
        paths.append(tmp_path / "sweep" / f"c{i}.safetensors")
        paths[-1].parent.mkdir(exist_ok=True)
        save_file(cand, paths[-1])
    return tmp_path / "theta0.safetensors", paths


def test_single_files_keep_dtypes_and_copy_non_float_tensors_from_theta0(tmp_path):
    base, cands = _single_files(tmp_path)
    out = tmp_path / "out.safetensors"
    # a folder of candidates
    assert main(["merge", "--base", str(base), "--candidates", str(cands[0].parent), "--method", "magmax",
                 "--lam", "1", "--exclude", "head.*", "--out", str(out)]) == 0  # fmt: skip
    got, base_sd = load_file(out), load_file(base)
    assert torch.equal(got["position_ids"], base_sd["position_ids"])  # never merged, though candidates differ
    assert torch.equal(got["head.w"], base_sd["head.w"])  # excluded: stays theta_0
    cands_sd = [load_file(c) for c in cands]
    for key in ("enc.w", "enc.b"):
        merged = ref_magmax([c[key].float() - base_sd[key].float() for c in cands_sd])
        assert got[key].dtype == torch.float16
        assert torch.equal(got[key], (base_sd[key].float() + (-1.0) * merged).to(torch.float16))
    sidecar = json.loads((tmp_path / "out.merge.json").read_text())
    assert sidecar["not_merged"]["non_floating"] == ["position_ids"]
    assert sidecar["not_merged"]["excluded"] == ["head.w"]
    assert set(sidecar["consensus_rate"]["per_tensor"]) == {"enc.w", "enc.b"}


def test_state_dict_files_and_open_clip_nesting_read_like_safetensors(tmp_path):
    base, cands = _single_files(tmp_path)
    pts = []
    for i, c in enumerate(cands):
        pts.append(tmp_path / f"c{i}.pt")
        sd = load_file(c)
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}} if i % 2 else sd, pts[-1])
    for name, candidates in (("st", cands), ("pt", pts)):
        assert main(["merge", "--base", str(base), "--candidates", *map(str, candidates), "--method", "negmerge",
                     "--set", "threshold=0.75", "--lam", "2", "--out", str(tmp_path / f"{name}.safetensors")]) == 0  # fmt: skip
    a, b = load_file(tmp_path / "st.safetensors"), load_file(tmp_path / "pt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _expect_refusal(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda sd: sd.update({"enc.b": torch.zeros(8, dtype=torch.float16)}), ["'enc.b'", "shape", "c2.safetensors"]),
        (lambda sd: sd.pop("head.w"), ["'head.w'", "missing", "c2.safetensors"]),
        (lambda sd: sd.update({"extra": torch.zeros(1)}), ["'extra'", "unexpected", "c2.safetensors"]),
        (lambda sd: sd.update({"enc.w": sd["enc.w"].to(torch.bfloat16)}), ["'enc.w'", "bfloat16", "c2.safetensors"]),
    ],
)
def test_a_mismatched_candidate_is_one_error_before_anything_is_written(tmp_path, capsys, damage, words):
    base, cands = _single_files(tmp_path)
    sd = load_file(cands[2])
    damage(sd)
    save_file(sd, cands[2])
    out = tmp_path / "out.safetensors"
    _expect_refusal(capsys, ["merge", "--base", str(base), "--candidates", *map(str, cands), "--method", "negmerge",
                             "--lam", "1", "--out", str(out)], *words)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_existing_out_is_refused_unless_overwrite(tmp_path, capsys):
    base, cands = _single_files(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_text("keep me")
    argv = ["merge", "--base", str(base), "--candidates", *map(str, cands), "--method", "average", "--lam", "1",
            "--out", str(out)]  # fmt: skip
    _expect_refusal(capsys, argv, "--overwrite")
    assert out.read_text() == "keep me"
    assert main([*argv, "--overwrite"]) == 0
    assert "enc.w" in load_file(out)


def test_bad_method_params_and_lambda_are_refused_by_name(tmp_path, capsys):
    base, cands = _single_files(tmp_path)
    common = ["merge", "--base", str(base), "--candidates", *map(str, cands), "--out", str(tmp_path / "o.safetensors")]
    _expect_refusal(capsys, [*common, "--method", "negmerg", "--lam", "1"], "negmerge")
    _expect_refusal(capsys, [*common, "--method", "ga", "--lam", "1"], "not a merge")
    _expect_refusal(capsys, [*common, "--method", "ties", "--set", "k=2", "--lam", "1"], "k")
    _expect_refusal(capsys, [*common, "--method", "ties", "--set", "depth=2", "--lam", "1"], "depth")
    _expect_refusal(capsys, [*common, "--method", "ties"], "--lam")
    assert not (tmp_path / "o.safetensors").exists()
