"""The export forms: a copy of a quantized model whose quantizers are replaced by modules that trace into the
ONNX graph a runtime fuses into integer kernels, computing the same values as vitq's fake quantization.

Each uniform quantizer becomes a QDQ pair with its own scale and zero point (per-channel weights with their
axis, 8-bit codes as int8/uint8; narrower activations clip to their code range first). Weights are stored as
their integer codes feeding a DequantizeLinear. PTF quantizers (FQ-ViT's LayerNorm inputs) are uniform per
channel with one zero point, so they are QDQ pairs too (a per-tensor pair with scale 1 between a division and a
multiplication by the channel scales). Every other kind (log2, twin, MPQ, ...) becomes the float operations of
its own ``fake_quant``. Every quantized MatMul reads two DequantizeLinear outputs directly (weights stored
transposed, kᵀ quantized after the transpose, the attention scale folded into q's dequantization scale).
What the runtimes' kernels need besides is asked of :mod:`vitq.export.runtimes`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.export.ops import DQFn, PaddedConvFn, QDQFn
from vitq.export.runtimes import (
    PER_AXIS_QDQ_AT_ATTENTION_MATMUL,
    UNSIGNED_SHIFT,
    conv_weights_as_qdq,
    matmul_b_needs_unsigned,
)
from vitq.quant.base import Quantizer, quantizers_of
from vitq.quant.modules import QAttentionBase, QConv2d, QLinear, QWeighted
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


def _integral(t: torch.Tensor) -> bool:
    return bool(torch.all(t == torch.round(t)))


class ExportQDQ(nn.Module):
    """An activation quantizer as a QDQ pair. ``axis`` is the channel axis of the tensor it sees (or None);
    ``dq_factor`` multiplies the dequantization scale (the attention scale folded into q); ``matmul_b``: the
    pair feeds a MatMul's second input, so wide signed codes go shifted into uint8 (the same values; see
    :func:`vitq.export.runtimes.matmul_b_needs_unsigned`)."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, signed: bool,
                 axis: int | None, dq_factor: float = 1.0, matmul_b: bool = False):
        super().__init__()
        shift = UNSIGNED_SHIFT if matmul_b and matmul_b_needs_unsigned(qmin, qmax, signed) else 0
        signed = signed and not shift
        dtype = torch.int8 if signed else torch.uint8
        full = (-128, 127) if signed else (0, 255)
        self.axis = None if axis is None else int(axis)  # negative: counted from the end
        scale = scale.detach().float().reshape(-1 if axis is not None else ())
        zero = torch.round(zero.detach().reshape(scale.shape)) + shift
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero", zero.to(dtype))
        self.register_buffer("dq_scale", (scale * dq_factor).clone())
        self.qmin, self.qmax = int(qmin) + shift, int(qmax) + shift
        narrow = (self.qmin, self.qmax) != full
        self.register_buffer("lo", (self.qmin - zero.float()) * scale if narrow else None)
        self.register_buffer("hi", (self.qmax - zero.float()) * scale if narrow else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = -1 if self.axis is None else self.axis % x.dim()  # -1 below: per tensor
        lo, hi = self.lo, self.hi
        if lo is not None and axis >= 0:  # bounds broadcast along the channel axis
            shape = [1] * x.dim()
            shape[axis] = -1
            lo, hi = lo.reshape(shape), hi.reshape(shape)
        return QDQFn.apply(x, self.scale, self.zero, self.dq_scale, lo, hi, axis, self.qmin, self.qmax)


class ExportPTF(nn.Module):
    """A PTF quantizer (per-channel scale ``s_c``, one zero point) as ``x / s_c`` -> a per-tensor QDQ pair with
    scale 1 -> ``· s_c``: the same values as its fake_quant, and per-tensor QDQ kernels are the fast ones."""

    def __init__(self, q: PTFQuantizer, factor: float = 1.0):
        super().__init__()
        self.register_buffer("channel_scale", q.channel_scale().detach().float().clone())
        self.qdq = ExportQDQ(torch.ones(()), q.zero_point.detach().clone(), q.qmin, q.qmax, False, None)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qdq(x / self.channel_scale) * self.channel_scale
        return y * self.factor if self.factor != 1.0 else y


class FloatFakeQuant(nn.Module):
    """A quantizer kind without a QDQ form: its own fake quantization traced as float operations (times an
    optional factor, the attention scale for q)."""

    def __init__(self, quantizer: Quantizer, factor: float = 1.0):
        super().__init__()
        self.quantizer = quantizer
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantizer.fake_quant(x)
        return y * self.factor if self.factor != 1.0 else y


class Scaled(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def weight_codes(q: UniformQuantizer, w: torch.Tensor) -> torch.Tensor:
    """The integer codes of ``w`` under the (per-output-channel) weight quantizer, as its fake_quant computes."""
    shape = [1] * w.dim()
    shape[q.channel_axis if q.channel_axis is not None else 0] = -1
    s = q.scale.reshape(shape) if q.channel_axis is not None else q.scale
    z = q.zero_point.reshape(shape) if q.channel_axis is not None else q.zero_point
    return torch.clamp(torch.round(w / s) + z, q.qmin, q.qmax)


# ----------------------------------------------------------------------------------------------- plan
class Plan:
    """What each quantizer becomes: ``qdq`` (a QDQ pair), ``float`` (its fake_quant as float ops) or
    ``identity`` (not calibrated, so it is the identity in vitq too)."""

    def __init__(self, opset: int):
        self.opset = opset
        self.how: dict[str, str] = {}
        self.weights: dict[str, dict] = {}  # weight quantizer name -> bits, storage
        self.own_forward: list[str] = []  # weighted layers / attentions exported with their own forward
        self.problems: list[str] = []

    def decide(self, name: str, q: Quantizer) -> str:
        if not bool(q.initialized):
            how = "identity"
        elif type(q) is UniformQuantizer:  # subclasses (e.g. uniform_mixed: bits per channel) have no QDQ form
            ok = _integral(q.zero_point) and q.bits <= 8
            how = "qdq" if ok else "float"
            if ok and q.channel_axis is not None and self.opset < MIN_OPSET:
                self.problems.append(name)
        elif isinstance(q, PTFQuantizer):
            how = "qdq" if _integral(q.zero_point) and q.bits <= 8 else "float"
            if how == "qdq" and self.opset < MIN_OPSET:
                self.problems.append(name)
        else:
            how = "float"
        self.how[name] = how
        return how

    def summary(self) -> dict:
        by: dict[str, list[str]] = {"qdq": [], "float": [], "identity": []}
        for n, h in self.how.items():
            by[h].append(n)
        return by


def _activation(name: str, q: Quantizer | nn.Module, plan: Plan, factor: float = 1.0, per_axis: bool = True,
                matmul_b: bool = False) -> nn.Module:
    """The export module standing in for one activation quantizer. ``per_axis`` False: a per-channel uniform
    quantizer is exported as float operations; ``matmul_b``: it feeds a MatMul's second input."""
    if not isinstance(q, Quantizer):  # an nn.Identity tap
        return Scaled(factor) if factor != 1.0 else nn.Identity()
    how = plan.decide(name, q)
    if how == "qdq" and not per_axis and getattr(q, "channel_axis", None) is not None:
        how = plan.how[name] = "float"
    if how == "identity":
        return Scaled(factor) if factor != 1.0 else nn.Identity()
    if how == "float":
        return FloatFakeQuant(q, factor)
    if isinstance(q, PTFQuantizer):
        return ExportPTF(q, factor)
    return ExportQDQ(q.scale, q.zero_point, q.qmin, q.qmax, q.signed, q.channel_axis, dq_factor=factor,
                     matmul_b=matmul_b)


class ExportWeighted(nn.Module):
    """A QWeighted layer (linear or convolution): input QDQ, weights as integer codes -> DequantizeLinear.
    Linear weights are stored transposed ([in, out], axis 1) so the MatMul reads the DequantizeLinear output
    directly; a patchify convolution (kernel = stride, no padding: ViT's patch embedding) becomes the same
    MatMul over patches. Weight bias correction, an affine map per output channel ``a·ŵ + b``, goes into the
    scale (``a``) and, for a MatMul, an output term ``b·Σx`` over each output's inputs; for a convolution,
    ``b`` is added to the dequantized weight. Other convolutions keep a DequantizeLinear -> Conv where the
    runtimes allow it (:func:`vitq.export.runtimes.conv_weights_as_qdq`) and a float weight otherwise. A layer
    that pads its input itself (``padded_conv``, e.g. TensorFlow 'SAME') becomes one Conv whose pads are those
    of the input size it was last run at (:func:`record_input_sizes`: the file's input size is static)."""

    def __init__(self, name: str, m: QWeighted, plan: Plan):
        super().__init__()
        w = m.weight.detach()
        self.name, self.pads = name, None
        self.input_pads = m.input_pads if getattr(type(m), "padded_conv", False) else None
        if w.dim() == 2:
            self.mode = "linear"
        else:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
            patchify = (tuple(m.stride) == tuple(w.shape[2:]) and tuple(m.padding) == (0, 0)
                        and tuple(m.dilation) == (1, 1) and m.groups == 1 and self.input_pads is None)
            self.mode = "patchify" if patchify else "conv"
            self.kernel = tuple(w.shape[2:])
        self.input_quant = _activation(f"{name}.input_quant", m.input_quant, plan)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        wq = m.weight_quant
        how = plan.decide(f"{name}.weight_quant", wq)
        for buf in ("codes", "w_scale", "w_zero", "correction", "float_weight"):
            self.register_buffer(buf, None)
        corrected = bool(m.weight_correction)
        if how == "qdq" and self.mode == "conv" and not conv_weights_as_qdq(not bool(wq.zero_point.any())):
            how = plan.how[f"{name}.weight_quant"] = "float"
        if how != "qdq" or wq.channel_axis not in (None, 0):
            if how == "qdq":
                plan.how[f"{name}.weight_quant"] = "float"
            self.float_weight = m.quantized_weight().detach().clone()
            if self.mode == "patchify":
                self.float_weight = self.float_weight.reshape(w.shape[0], -1).t().contiguous()
            elif self.mode == "linear":
                self.float_weight = self.float_weight.t().contiguous()
            return
        codes = weight_codes(wq, w)
        scale = wq.scale.detach().float().reshape(-1).expand(w.shape[0]).clone()
        zero = wq.zero_point.detach().reshape(-1).expand(w.shape[0]).clone().round()
        if corrected:
            w_hat = wq.fake_quant(w)
            dims = tuple(range(1, w.dim()))
            a = (w.std(dims) / w_hat.std(dims).clamp_min(1e-12))
            b = w.mean(dims) - w_hat.mean(dims) * a
            scale = scale * a
            self.correction = b.float().reshape(-1, 1, 1, 1) if self.mode == "conv" else b.float()
        signed = wq.signed
        if matmul_b_needs_unsigned(wq.qmin, wq.qmax, signed):
            codes, zero, signed = codes + UNSIGNED_SHIFT, zero + UNSIGNED_SHIFT, False
        dtype = torch.int8 if signed else torch.uint8
        self.axis = 0 if self.mode == "conv" else 1
        self.codes = (codes if self.mode == "conv" else codes.reshape(w.shape[0], -1).t()).contiguous().to(dtype)
        self.w_scale, self.w_zero = scale, zero.to(dtype)
        plan.weights[f"{name}.weight_quant"] = {"bits": wq.bits, "signed": wq.signed, "shape": list(w.shape),
                                                "stored_signed": signed}

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: DequantizeLinear of the codes (plus a convolution's weight
        correction), or the float weight ([in, out] for a MatMul, as stored)."""
        if self.codes is None:
            return self.float_weight
        w = DQFn.apply(self.codes, self.w_scale, self.w_zero, self.axis)
        return w + self.correction if self.mode == "conv" and self.correction is not None else w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a layer's ``weight`` (e.g. its dtype: Hugging Face
        models cast the image to the patch embedding's weight dtype); traced, it is an unused node."""
        return self.dequantized_weight()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.dequantized_weight())
        if self.correction is not None:
            y = y + x.sum(-1, keepdim=True) * self.correction
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "linear":
            return self._matmul(self.input_quant(x))
        if self.mode == "conv" and self.input_pads is not None:
            if not torch.jit.is_tracing():
                self.pads = tuple(self.input_pads(x.shape[-2], x.shape[-1]))
            elif self.pads is None:
                raise VitqError(f"{self.name}: pads its input by its size; run the export model once on an input "
                                "of the file's size before tracing (record_input_sizes)")
            return PaddedConvFn.apply(self.input_quant(x), self.dequantized_weight(), self.bias, self.kernel,
                                       self.stride, self.pads, self.dilation, self.groups)
        if self.mode == "conv":
            return F.conv2d(self.input_quant(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        B, C, H, W = x.shape  # patchify: [B, C, H, W] -> [B, h*w, C*kh*kw] patches, one MatMul, back to NCHW
        kh, kw = self.kernel
        h, w = H // kh, W // kw
        p = x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw)
        y = self._matmul(self.input_quant(p))
        return y.transpose(1, 2).reshape(B, -1, h, w)


def record_input_sizes(emodel: nn.Module, example: torch.Tensor) -> None:
    """Run the export model once, untraced, on ``example``, so layers that pad by their input size hold the
    pads of the file's (static) input size when it is traced."""
    if any(isinstance(m, ExportWeighted) and m.input_pads is not None for m in emodel.modules()):
        with torch.no_grad():
            emodel(example)


def rebuildable_weighted(m: QWeighted) -> bool:
    """Whether ``m`` computes what :class:`ExportWeighted` rebuilds: QLinear's or QConv2d's own forward, or a
    QConv2d that declares ``padded_conv`` (its forward zero-pads the quantized input by ``input_pads(h, w)``,
    then convolves without padding)."""
    known = type(m).forward in (QLinear.forward, QConv2d.forward) or (
        isinstance(m, QConv2d) and getattr(type(m), "padded_conv", False) and callable(getattr(m, "input_pads", None)))
    return known and m.weight.dim() in (2, 4)


def rebuildable_attention(m: QAttentionBase) -> bool:
    """Whether ``m`` computes the shared core as :class:`ExportAttention` rebuilds it: fused ``qkv``, the base
    class's ``_project`` (q, k, v of equal width, in that order), ``_qkv`` and ``_softmax_v``, scores
    ``(q·scale)·kᵀ + score_bias() [+ window mask]``. (LeViT's attention splits its heads into q, k, v of different
    widths: it keeps its own forward.)"""
    cls = type(m)
    return (isinstance(getattr(m, "qkv", None), nn.Module) and isinstance(getattr(m, "proj", None), nn.Module)
            and cls._project is QAttentionBase._project and cls._qkv is QAttentionBase._qkv
            and cls._softmax_v is QAttentionBase._softmax_v)


class ExportAttention(nn.Module):
    """vitq's quantized attention (any :class:`QAttentionBase` with the shared core) with the QDQ pairs right at
    both matmul inputs: the attention scale is folded into q's dequantization scale (or applied after q's float
    fake quantization) and k is quantized after its transpose (the same values: per-tensor or per-head scales
    are unaffected). The attention's ``score_bias()`` is added to the scores, then a mask when the block passes
    one (Swin's shifted windows: [windows, N, N], added per window as the source attention does)."""

    def __init__(self, name: str, m: QAttentionBase, plan: Plan):
        super().__init__()
        self.num_heads, self.qkv, self.proj = m.num_heads, m.qkv, m.proj
        bias = m.score_bias()
        self.register_buffer("score_bias", None if bias is None else bias.detach().float().clone())
        per_axis = PER_AXIS_QDQ_AT_ATTENTION_MATMUL
        self.q_quant = _activation(f"{name}.q_quant", m.q_quant, plan, factor=float(m.scale), per_axis=per_axis)
        self.k_quant = _activation(f"{name}.k_quant", m.k_quant, plan, per_axis=per_axis, matmul_b=True)
        self.v_quant = _activation(f"{name}.v_quant", m.v_quant, plan, per_axis=per_axis, matmul_b=True)
        self.score_quant = _activation(f"{name}.score_quant", m.score_quant, plan)
        self.softmax_quant = _activation(f"{name}.softmax_quant", m.softmax_quant, plan)
        # a kind without a QDQ form sees k itself (its fake_quant need not commute with the transpose)
        self.k_before_transpose = isinstance(self.k_quant, FloatFakeQuant)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *_, **__) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        kt = self.k_quant(k).transpose(-2, -1) if self.k_before_transpose else self.k_quant(k.transpose(-2, -1))
        scores = self.q_quant(q) @ kt
        if self.score_bias is not None:
            scores = scores + self.score_bias
        if mask is not None:
            nw, n = mask.shape[0], scores.shape[-1]
            scores = (scores.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0))
            scores = scores.view(-1, self.num_heads, n, n)
        attn = self.softmax_quant(self.score_quant(scores).softmax(dim=-1))
        out = (attn @ self.v_quant(v)).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


def _bake_weight(name: str, m: QWeighted, plan: Plan) -> None:
    """A weighted layer that keeps its own forward: its quantized (and corrected) weight becomes the weight,
    exported as a float constant."""
    key = f"{name}.weight_quant"
    if plan.decide(key, m.weight_quant) == "qdq":
        plan.how[key] = "float"
    with torch.no_grad():
        m.weight = nn.Parameter(m.quantized_weight().detach().clone(), requires_grad=False)
    m.weight_correction.zero_()
    m.weight_quant = nn.Identity()


def export_module(qmodel: nn.Module, opset: int = DEFAULT_OPSET) -> tuple[nn.Module, Plan]:
    """A copy of ``qmodel`` with every quantizer replaced by its export form (see :class:`Plan`). Weighted layers
    and attentions are rebuilt in the fused layout where they compute what the rebuilt module computes; any
    other module (one with a forward of its own included, listed in ``plan.own_forward``) keeps its forward,
    with its quantizers replaced in place: the same values, fewer integer kernels."""
    model = copy.deepcopy(qmodel).cpu().eval()
    plan = Plan(opset)
    for name, m in list(model.named_modules()):
        if isinstance(m, QWeighted) and rebuildable_weighted(m):
            new = ExportWeighted(name, m, plan)
        elif isinstance(m, QAttentionBase) and rebuildable_attention(m):
            new = ExportAttention(name, m, plan)
        else:
            if isinstance(m, (QWeighted, QAttentionBase)):
                plan.own_forward.append(f"{name} ({type(m).__name__})")
            if isinstance(m, QWeighted):
                _bake_weight(name, m, plan)
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for name, m in list(model.named_modules()):  # the rest: residual / LayerNorm inputs and any others
        if isinstance(m, FloatFakeQuant):
            continue
        attention = isinstance(m, QAttentionBase)
        for child_name, child in list(m.named_children()):
            if isinstance(child, Quantizer):
                full = f"{name}.{child_name}" if name else child_name
                kw = {}
                if attention and child_name in ("q_quant", "k_quant", "v_quant"):
                    kw = {"per_axis": PER_AXIS_QDQ_AT_ATTENTION_MATMUL, "matmul_b": child_name != "q_quant"}
                setattr(m, child_name, _activation(full, child, plan, **kw))
    missing = sorted(set(quantizers_of(qmodel)) - set(plan.how))
    if missing:  # a quantizer inside a module we did not rebuild: keep the model correct by saying so
        raise VitqError(f"quantizers {', '.join(missing[:4])} are inside modules vitq export does not handle")
    return model, plan
