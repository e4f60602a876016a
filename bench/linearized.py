"""The linearised (tangent) image encoder: f(x; theta_0) + J_theta f(x; theta_0) . (theta - theta_0).

Ortiz-Jimenez, Favero, Frossard, "Task Arithmetic in the Tangent Space", NeurIPS 2023
(gortizji/tangent_task_arithmetic): fine-tune the first-order Taylor expansion of the encoder around
theta_0 instead of the encoder, and negate the resulting task vector on that linear model.

The Jacobian-vector product is ``torch.func.jvp`` over ``torch.func.functional_call``. The primal
f(x; theta_0) is the encoder's own forward pass, computed apart from the jvp, so at theta = theta_0
the linear model's outputs are the encoder's bits (the jvp's primal runs attention through another
kernel, see ``MathAttention``, and differs in the last bits). Only the parameters that train are in
the tangent: a frozen group (``freeze: [attention]``) is held at theta_0 and adds nothing.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.overrides import TorchFunctionMode

# Forward-AD levels are process-global in torch, not per thread: two jvps at once (evaluation lanes
# are threads) corrupt each other's level ("a forward AD level with an invalid index"). One at a time.
_JVP_LOCK = threading.Lock()


class MathAttention(TorchFunctionMode):
    """Attention through ops that forward-mode AD can differentiate (the fused CPU and GPU kernels
    have no forward derivative): ``scaled_dot_product_attention`` through torch's math kernel, and
    ``nn.MultiheadAttention`` (open_clip's blocks) through its explicit path, which it takes when
    asked for the attention weights (the weights are dropped again). A torch-function mode is per
    thread, unlike ``sdpa_kernel``'s global flags, so evaluation lanes running the encoder beside a
    jvp keep their own kernels; while it is on, ``nn.MultiheadAttention`` also stays off its fused
    eval fast path."""

    _ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            kwargs.update(zip(self._ARGS, rest))
            scale, gqa = kwargs.pop("scale", None), kwargs.pop("enable_gqa", False)
            out = torch.ops.aten._scaled_dot_product_attention_math(
                q,
                k,
                v,
                kwargs.get("attn_mask"),
                kwargs.get("dropout_p", 0.0),
                kwargs.get("is_causal", False),
                scale=scale,
                enable_gqa=gqa,
            )
            return out[0]
        if func is F.multi_head_attention_forward:  # its explicit path (bmm, softmax, bmm) instead of the fused op
            return func(*args, **{**kwargs, "need_weights": True, "average_attn_weights": True})[0], None
        return func(*args, **kwargs)


def tangent(
    module: torch.nn.Module, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """J_theta f(x; base) . delta: the change of ``module``'s output along ``delta`` (keys: a subset of
    its parameters; the others, and every buffer, at their ``base`` or current values)."""
    fixed = {k: v.detach() for k, v in base.items() if k not in delta}
    primals = {k: base[k].detach() for k in delta}

    def f(moving: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(module, {**fixed, **moving}, (x,))

    with _JVP_LOCK, MathAttention():
        _, out = jvp(f, (primals,), (dict(delta),))
    return out


class LinearizedEncoder(torch.nn.Module):
    """An image encoder's first-order Taylor expansion around theta_0, trained in place of it.

    Its parameters are theta, with the encoder's names, shapes and ``requires_grad`` (it shares the
    parameter, buffer and submodule tables of a private copy of the encoder), so the fine-tuning loop,
    the optimiser, gradient clipping, the frozen groups and ``state_dict`` treat it exactly as the
    encoder, and ``task_vector(state_dict, theta_0)`` is theta - theta_0. theta_0 is a detached copy
    that moves with the module (``_apply``) and is never trained."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        skeleton = copy.deepcopy(encoder)
        self.__dict__["_skeleton"] = skeleton  # not a submodule: its tables are this module's own
        self._parameters = skeleton._parameters
        self._buffers = skeleton._buffers
        self._non_persistent_buffers_set = skeleton._non_persistent_buffers_set
        self._modules = skeleton._modules
        self.__dict__["_theta0"] = {k: p.detach().clone() for k, p in skeleton.named_parameters()}
        self.train(encoder.training)

    def train(self, mode: bool = True) -> LinearizedEncoder:
        super().train(mode)
        self._skeleton.training = mode
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.__dict__["_theta0"] = {k: fn(v) for k, v in self._theta0.items()}
        return self

    @property
    def theta0(self) -> dict[str, torch.Tensor]:
        return self._theta0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            primal = functional_call(self._skeleton, self._theta0, (x,))
        delta = {n: p - self._theta0[n] for n, p in self.named_parameters() if p.requires_grad}
        if not delta:
            return primal
        return primal + tangent(self._skeleton, self._theta0, delta, x)
