"""Where bf16 loses an edit theta_0 + coef * tau: fp32-vs-bf16 agreement of an edited encoder's logits.

Not a test (numbers, not assertions): the figures in docs/metrics.md ("Precision and the lambda
curve") come from it. Three bf16 cases against the fp32 evaluation of the same edit, each through
``bench.evaluate.Evaluator`` (``load_edit`` + ``logits``, as a run evaluates a lambda point):

- ``weights rounded``: the edited weights rounded to bf16, computed in fp32: the weight rounding alone;
- ``autocast``: the run's bf16 path (``Runtime.autocast``), weights rounded per op *and* bf16 arithmetic;
- ``autocast, edit split``: bf16 autocast with every matmul weight evaluated as x.W0 + coef * x.tau,
  each in bf16 (the edit keeps its own exponent): what a fix of the weight rounding would give.

    python benchmarks/bf16_edit_agreement.py MODEL [CHECKPOINT|""] [TAU.safetensors|""] N [LAM]

Without a task vector: a random one at 1% of each tensor's std. Inputs: N random uint8 images.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import bench  # noqa: F401  (the suite's CPU numerics settings, as a run has them)
from bench.backbones import load_backbone, visual_state
from bench.data import ImageSplit
from bench.device import CPU, resolve_runtime
from bench.evaluate import Evaluator

MATMUL_SUFFIXES = ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight", "conv1.weight")


class SplitEdit(TorchFunctionMode):
    """linear / conv2d / matmul with a weight of ``taus`` (by id) computed as op(x, W) + op(x, tau).

    open_clip's attention calls F.multi_head_attention_forward, which is not linear in its weights:
    its self-attention slow path is spelled out here with the same primitives, so the in- and
    out-projections reach ``linear`` (exact in fp32: checked by ``--check``)."""

    def __init__(self, taus: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.taus = taus

    def linear(self, x, w, b=None):
        y = F.linear(x, w, b)
        return y + F.linear(x, self.taus[id(w)]) if id(w) in self.taus else y

    def attention(self, query, key, value, embed_dim, num_heads, in_w, in_b, bias_k, bias_v, zero_attn,
                  dropout_p, out_w, out_b, training=True, key_padding_mask=None, need_weights=True,
                  attn_mask=None, *rest, **kwargs):  # fmt: skip
        if not (query is key is value) or need_weights or bias_k is not None or key_padding_mask is not None:
            raise NotImplementedError("SplitEdit covers open_clip's self-attention only")
        length, batch, _ = query.shape
        heads = [
            t.reshape(length, batch * num_heads, embed_dim // num_heads).transpose(0, 1).reshape(batch, num_heads, length, -1)
            for t in self.linear(query, in_w, in_b).unflatten(-1, (3, embed_dim)).unbind(-2)
        ]  # fmt: skip
        mask = attn_mask.unsqueeze(0) if attn_mask is not None else None
        out = F.scaled_dot_product_attention(*heads, mask, 0.0, kwargs.get("is_causal", False))
        out = self.linear(out.permute(2, 0, 1, 3).reshape(batch * length, embed_dim), out_w, out_b)
        return out.view(length, batch, embed_dim), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self.attention(*args, **kwargs)
        if func is F.linear:
            return self.linear(*args, **kwargs)
        if func is F.conv2d and id(args[1]) in self.taus:
            return func(*args, **kwargs) + func(args[0], self.taus[id(args[1])], None, *args[3:], **kwargs)
        if func in (torch.Tensor.matmul, torch.Tensor.__matmul__, torch.matmul) and id(args[1]) in self.taus:
            return func(*args) + func(args[0], self.taus[id(args[1])])
        return func(*args, **kwargs)


def main(name: str, pretrained: str, tau_path: str, n: int, lam: float = 0.5) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    backbone = load_backbone(name, pretrained or None)
    theta0 = visual_state(backbone)
    if tau_path:
        tau = load_file(tau_path)
    else:
        tau = {k: 0.01 * v.float().std().clamp_min(1e-3) * torch.randn_like(v) for k, v in theta0.items()}
    size = backbone.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    split = ImageSplit(labels=torch.zeros(n, dtype=torch.long), images=images)
    width = backbone.model.text_projection.shape[1]
    head = F.normalize(torch.randn(10, width, generator=torch.Generator().manual_seed(2)), dim=-1)
    bf16 = resolve_runtime("cpu", "bf16")

    def logits(runtime, coef, rounded=False, split_keys=()):
        ev = Evaluator(backbone, batch_size=64, runtime=runtime)
        ev.set_base(theta0)
        ev.load_edit({k: v for k, v in tau.items() if k not in split_keys}, coef)
        if rounded:
            ev.load({k: v.to(torch.bfloat16).float() for k, v in ev.params.items()})
        if not split_keys:
            return ev.logits(split, head)
        with SplitEdit({id(ev.params[k]): coef * tau[k] for k in split_keys}):
            return ev.logits(split, head)

    base32, edit32 = logits(CPU, 0.0), logits(CPU, -lam)
    split_keys = tuple(k for k in tau if k.endswith(MATMUL_SUFFIXES) or k == "proj")
    if "--check" in sys.argv:  # the split is exact in fp32
        print("split in fp32, max |diff|:", (logits(CPU, -lam, split_keys=split_keys) - edit32).abs().max().item())
    cases = {
        "weights rounded to bf16, fp32 compute": (logits(CPU, 0.0, rounded=True), logits(CPU, -lam, rounded=True)),
        "bf16 autocast (the run's path)": (logits(bf16, 0.0), logits(bf16, -lam)),
        "bf16 autocast, edit split x.W0 + x.(coef tau)": (logits(bf16, 0.0), logits(bf16, -lam, split_keys=split_keys)),
    }
    lost = sum(
        int(((v - lam * tau[k]).bfloat16() == v.bfloat16()).sum())
        for k, v in theta0.items()
        if k in tau and v.dim() > 1
    )
    total = sum(v.numel() for k, v in theta0.items() if k in tau and v.dim() > 1)
    effect32 = edit32 - base32
    for label, (base, edit) in cases.items():
        diff = (edit - edit32).abs()
        cosine = F.cosine_similarity(effect32.flatten(), (edit - base).flatten(), dim=0).item()
        print(json.dumps({
            "model": name, "trained": bool(pretrained), "tau": tau_path.rsplit("/", 1)[-1] or "random 1% of std",
            "lam": lam, "images": n, "case": label,
            "edit elements lost to bf16 weight rounding (%)": round(100 * lost / total, 1),
            "max |logit diff|": round(diff.max().item(), 4), "mean |logit diff|": round(diff.mean().item(), 4),
            "top-1 agreement (%)": round(100 * (edit.argmax(-1) == edit32.argmax(-1)).float().mean().item(), 2),
            "mean |edit effect| fp32": round(effect32.abs().mean().item(), 4),
            "cosine(edit effect bf16, fp32)": round(cosine, 4),
        }))  # fmt: skip


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(positional[0], positional[1], positional[2], int(positional[3]), *map(float, positional[4:5]))
