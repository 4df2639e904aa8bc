"""The attention matmuls of any model, quantized where the model computes them: by intercepting the calls.

A model's attention is found by running it once with a torch function mode that records every call of
``F.scaled_dot_product_attention``, ``torch.matmul`` / ``@``, ``torch.bmm`` and two-operand ``torch.einsum``
together with the innermost module running at that moment (its *owner*, e.g. timm's ``Attention``,
``EvaAttention``, ``XCA``, ``WindowAttention``). Each owner gets one :class:`OpSite` per call, in call order,
holding the quantizers of that call's inputs (``vitq_ops``, a ModuleList, so they are in the state dict), and a
forward pre-hook / hook pair that runs the owner's own forward under :class:`_Intercept`: the n-th intercepted
call of a forward is computed by the n-th site, quantized (the module's forward itself is not touched).

- ``scaled_dot_product_attention(q, k, v, ...)`` becomes ``softmax((q̂·scale)·k̂ᵀ + mask)`` quantized, times
  v̂ (quantizers ``q_quant``, ``k_quant``, ``v_quant``, ``softmax_quant``: both matmul inputs, as the
  ``matmul`` scheme quantizes a timm ``Attention``); masks, causal masks, an explicit ``scale`` and grouped
  key/value heads are honoured;
- an explicit matmul ``a @ b`` gets ``a_quant`` and ``b_quant``, with the roles ``softmax`` / ``v`` when ``a``
  is the output of a softmax computed in the same module (attention probabilities times values) and ``q`` /
  ``k`` otherwise (scores, or linear attention's kᵀv and q(kᵀv)).

Why interception rather than graph capture: on 18 timm architectures tried (DeiT, EVA-02, CaiT, ConViT,
CrossViT, XCiT, EfficientFormer v1/v2, EfficientViT (MIT and MSRA), MobileViT, TinyViT, LeViT-conv, Swin,
PiT, ...) every attention owner was found by the recording pass, while ``torch.fx.symbolic_trace`` of the
same owners failed on ConViT's ``GPSA`` and EfficientViT's ``LiteMLA`` (Python control flow on traced
values), and whole-model capture (FX, ``torch.export``) would flatten the model's own block lists, which
block-wise methods need. Interception keeps the model's modules and names and runs its own Python code, so
it also traces into the ONNX export (``torch.onnx.export`` records the quantized ops the mode computes).
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vitq.errors import VitqError
from vitq.quant.modules import QWeighted, activation_quantizer

MATMULS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "einsum"}
SDPA = "scaled_dot_product_attention"
_STATE = threading.local()  # .busy: a site is computing (its own matmuls are not intercepted again)


def _busy() -> bool:
    return getattr(_STATE, "busy", False)


def caller_module() -> nn.Module | None:
    """The module whose Python code made the current call: the innermost frame whose ``self`` is a module
    (torch's own call machinery has no module ``self`` below the module's forward), so a call made by a
    child module (e.g. the matmul of an exported linear layer) is not taken for the owner's own."""
    frame = sys._getframe(2)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module):
            return obj
        frame = frame.f_back
    return None


def _operands(name: str, args: tuple, kwargs: dict):
    """(a, b, rebuild) for a matmul-like call, rebuild(a_hat, b_hat) computing it on new operands; None when
    the call is not a two-tensor product (e.g. a one-operand einsum)."""
    if name == "einsum":
        eq, ops = args[0], args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if len(ops) != 2:
            return None
        return ops[0], ops[1], lambda a, b: torch.einsum(eq, a, b)
    if name == "__rmatmul__":
        return args[1], args[0], lambda a, b: torch.matmul(a, b)
    if name == "bmm":
        return args[0], args[1], lambda a, b: torch.bmm(a, b)
    if kwargs:
        return None
    return args[0], args[1], lambda a, b: torch.matmul(a, b)


class OpSite(nn.Module):
    """The quantizers of one intercepted call: ``kind`` ``sdpa`` (q, k, v, softmax) or ``matmul`` (a, b)."""

    def __init__(self, kind: str, roles: tuple[str, str], scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        self.kind = kind
        if kind == SDPA:
            self.q_quant = activation_quantizer(scheme, a_bits, "q")
            self.k_quant = activation_quantizer(scheme, a_bits, "k")
            self.v_quant = activation_quantizer(scheme, a_bits, "v")
            self.softmax_quant = activation_quantizer(scheme, softmax_bits, "softmax")
        else:
            self.roles = roles
            self.a_quant = activation_quantizer(scheme, softmax_bits if roles[0] == "softmax" else a_bits, roles[0])
            self.b_quant = activation_quantizer(scheme, a_bits, roles[1])

    def extra_repr(self) -> str:
        return self.kind if self.kind == SDPA else f"{self.kind} {self.roles[0]} x {self.roles[1]}"

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """scaled_dot_product_attention with both matmuls' inputs quantized (dropout: eval only)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        scores = (q * scale) @ k.transpose(-2, -1)
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        return self.softmax_quant(scores.softmax(dim=-1)) @ v

    def product(self, a, b, rebuild):
        return rebuild(self.a_quant(a), self.b_quant(b))


class _Intercept(TorchFunctionMode):
    """Active during one owner's forward: hands its n-th matmul / attention call to its n-th site."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.owner = owner
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _busy() or (name != SDPA and name not in MATMULS) or caller_module() is not self.owner:
            return func(*args, **kwargs)
        sites = self.owner.vitq_ops
        if self.count >= len(sites):
            raise VitqError(f"{self.owner.vitq_ops_name} ({type(self.owner).__name__}) made more matmul/attention "
                            f"calls ({self.count + 1}) than when it was prepared ({len(sites)}); vitq's generic path "
                            "needs the same calls on every forward")
        site = sites[self.count]
        self.count += 1
        kind = SDPA if name == SDPA else "matmul"
        ops = _operands(name, args, kwargs) if kind == "matmul" else None
        if site.kind != kind or (kind == "matmul" and ops is None):
            raise VitqError(f"{self.owner.vitq_ops_name} ({type(self.owner).__name__}): call {self.count} is "
                            f"{name}, prepared as {site.kind}")
        _STATE.busy = True
        try:
            return site.attention(*args, **kwargs) if kind == SDPA else site.product(*ops)
        finally:
            _STATE.busy = False


def _enter(module: nn.Module, args) -> None:
    mode = _Intercept(module)
    module.__dict__.setdefault("_vitq_modes", []).append(mode)
    mode.__enter__()


def _leave(module: nn.Module, args, output) -> None:
    modes = module.__dict__.get("_vitq_modes")
    if modes:
        modes.pop().__exit__(None, None, None)


# --------------------------------------------------------------------------------------------- discovery
class _Recorder(TorchFunctionMode):
    """Records the matmul / attention calls and the weighted functional ops of one forward, by owner."""

    def __init__(self, names: dict):
        super().__init__()
        self.names = names
        self.calls: list[tuple[str, str, tuple[str, str]]] = []  # owner, kind, roles
        self.softmax_out: dict[str, set[int]] = {}  # owner -> data pointers of its softmax outputs
        self.param_ops: list[tuple[str, str]] = []  # (owner, op) of F.linear/conv* fed a parameter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        watched = name in ("softmax", SDPA) or name in MATMULS or name.startswith(("linear", "conv", "bilinear"))
        if not watched:
            return out
        owner = self.names.get(caller_module(), "")
        if name == "softmax" and isinstance(out, torch.Tensor):
            self.softmax_out.setdefault(owner, set()).add(out.data_ptr())
        elif name == SDPA:
            self.calls.append((owner, SDPA, ("q", "k")))
        elif name in MATMULS:
            ops = _operands(name, args, kwargs)
            if ops is None:
                raise VitqError(f"module {owner or 'the model'} calls {name} with operands vitq's generic path "
                                "cannot quantize (expected two tensors)")
            probs = isinstance(ops[0], torch.Tensor) and ops[0].data_ptr() in self.softmax_out.get(owner, ())
            self.calls.append((owner, "matmul", ("softmax", "v") if probs else ("q", "k")))
        elif any(isinstance(a, nn.Parameter) for a in (*args, *kwargs.values())):
            self.param_ops.append((owner, name))
        return out


@torch.no_grad()
def record_calls(model: nn.Module, example: torch.Tensor) -> _Recorder:
    """One forward of ``model`` recording, per owner module, its matmul / attention calls in order."""
    rec = _Recorder({m: n for n, m in model.named_modules()})
    with rec:
        model(example)
    return rec


def attach_sites(model: nn.Module, rec: _Recorder, scheme) -> dict[str, list[str]]:
    """Give each owner of recorded calls its sites and hooks; returns {owner: [site descriptions]}."""
    by_owner: dict[str, list] = {}
    for owner, kind, roles in rec.calls:
        by_owner.setdefault(owner, []).append((kind, roles))
    out = {}
    for owner, calls in by_owner.items():
        module = model.get_submodule(owner)
        if not owner or isinstance(module, QWeighted):
            raise VitqError(f"{'the model itself' if not owner else owner} ({type(module).__name__}) computes "
                            "matmuls in its own forward; vitq's generic path quantizes them only inside a "
                            "submodule (an attention module)")
        _, a, s = scheme.bits_for(owner)
        module.vitq_ops = nn.ModuleList(OpSite(kind, roles, scheme, a, s) for kind, roles in calls)
        module.vitq_ops_name = owner
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_leave, always_call=True)
        out[owner] = [site.extra_repr() for site in module.vitq_ops]
    return out

