"""``vitq export``: a quantized model as an ONNX graph with QuantizeLinear/DequantizeLinear (QDQ) pairs.

Each uniform quantizer becomes a QDQ pair with its own scale and zero point (per-channel weights with their axis,
8-bit codes as int8/uint8; narrower activations clip to their code range first). Weights are stored as their
integer codes feeding a DequantizeLinear (INT4/UINT4 at opset >= 21 for weights of 4 bits or fewer, otherwise
int8/uint8 codes restricted to the narrower range), so the file is small. PTF quantizers (FQ-ViT's LayerNorm
inputs) are uniform per channel with one zero point, so they are QDQ pairs too (a per-tensor pair with scale 1
between a division and a multiplication by the channel scales).
Every other kind (log2, twin, MPQ, ...) is exported as the float operations of its own ``fake_quant``, which
compute exactly the same values; :func:`export` lists them.

The graph is laid out so that runtimes fuse it into integer kernels: every quantized MatMul reads two
DequantizeLinear outputs directly (weights stored transposed, kᵀ quantized after the transpose, the attention
scale folded into q's dequantization scale). A preprocessing JSON (resize, crop, mean, std, interpolation)
is written beside the model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitq.errors import VitqError
from vitq.models.timm_vit import QWindowAttention
from vitq.quant.base import Quantizer, quantizers_of
from vitq.quant.modules import QAttentionBase, QConv2d, QLinear
from vitq.quant.uniform import PTFQuantizer, UniformQuantizer

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
TORCHSCRIPT_MAX_OPSET = 20  # newer opsets: exported at 20, then converted by onnx.version_converter
INSTALL_HINT = "pip install -e '.[export]'"


def require(module: str):
    """Import an optional dependency of the export extra, or fail with one line saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitqError(f"vitq export needs {module.split('.')[0]} (missing; install the extra: "
                        f"{INSTALL_HINT})") from None


# ----------------------------------------------------------------------------------------------- QDQ ops
class _QDQFn(torch.autograd.Function):
    """Fake quantization that exports as [Clip] -> QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero, dq_scale, lo, hi, axis: int, qmin: int, qmax: int):
        shape = [1] * x.dim()
        if axis >= 0:
            shape[axis] = -1
        s, z, ds = scale.view(shape), zero.to(x.dtype).view(shape), dq_scale.view(shape)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        return (q - z) * ds

    @staticmethod
    def symbolic(g, x, scale, zero, dq_scale, lo, hi, axis: int, qmin: int, qmax: int):
        kw = {"axis_i": axis} if axis >= 0 else {}
        if lo is not None:
            if axis >= 0:  # Clip takes scalars only; per-channel bounds as Max/Min
                x = g.op("Min", g.op("Max", x, lo), hi)
            else:
                x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero, **kw)
        return g.op("DequantizeLinear", q, dq_scale, zero, **kw)


class _DQFn(torch.autograd.Function):
    """Integer codes (a constant) -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero, axis: int):
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.float() - zero.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero, axis: int):
        out = g.op("DequantizeLinear", codes, scale, zero, axis_i=axis)
        out.setType(codes.type().with_dtype(torch.float32))  # Conv's exporter needs the kernel shape
        return out


def _code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def _integral(t: torch.Tensor) -> bool:
    return bool(torch.all(t == torch.round(t)))


class ExportQDQ(nn.Module):
    """An activation quantizer as a QDQ pair. ``axis`` is the channel axis of the tensor it sees (or None);
    ``dq_factor`` multiplies the dequantization scale (the attention scale folded into q)."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int, signed: bool,
                 axis: int | None, dq_factor: float = 1.0):
        super().__init__()
        dtype = _code_dtype(signed)
        full = (-128, 127) if signed else (0, 255)
        self.axis = None if axis is None else int(axis)  # negative: counted from the end
        scale = scale.detach().float().reshape(-1 if axis is not None else ())
        zero = zero.detach().reshape(scale.shape)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero", torch.round(zero).to(dtype))
        self.register_buffer("dq_scale", (scale * dq_factor).clone())
        self.qmin, self.qmax = int(qmin), int(qmax)
        narrow = (self.qmin, self.qmax) != full
        self.register_buffer("lo", (qmin - zero.float()) * scale if narrow else None)
        self.register_buffer("hi", (qmax - zero.float()) * scale if narrow else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = -1 if self.axis is None else self.axis % x.dim()  # -1 below: per tensor
        lo, hi = self.lo, self.hi
        if lo is not None and axis >= 0:  # bounds broadcast along the channel axis
            shape = [1] * x.dim()
            shape[axis] = -1
            lo, hi = lo.reshape(shape), hi.reshape(shape)
        return _QDQFn.apply(x, self.scale, self.zero, self.dq_scale, lo, hi, axis, self.qmin, self.qmax)


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


def _activation(name: str, q: Quantizer | nn.Module, plan: Plan, factor: float = 1.0,
                per_axis: bool = True) -> nn.Module:
    """The export module standing in for one activation quantizer. ``per_axis`` False: a per-channel uniform
    quantizer is exported as float operations (onnxruntime 1.32 fuses a per-head QDQ pair at a MatMul input
    into a MatMulIntegerToFloat kernel that then fails at run time)."""
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
    return ExportQDQ(q.scale, q.zero_point, q.qmin, q.qmax, q.signed, q.channel_axis, dq_factor=factor)


class ExportWeighted(nn.Module):
    """QLinear / QConv2d: input QDQ, weights as integer codes -> DequantizeLinear. Linear weights are stored
    transposed ([in, out], axis 1) so the MatMul reads the DequantizeLinear output directly; a patchify
    convolution (kernel = stride, no padding: ViT's patch embedding) becomes the same MatMul over patches.
    Weight bias correction, an affine map per output channel ``a·ŵ + b``, goes into the scale (``a``) and an
    output term ``b·Σx`` over each output's inputs. Other convolutions keep a DequantizeLinear -> Conv when
    their weights are symmetric, and a float weight otherwise (onnxruntime 1.32 fuses them into a
    QLinearConv that rejects per-channel zero points)."""

    def __init__(self, name: str, m: QLinear | QConv2d, plan: Plan):
        super().__init__()
        if isinstance(m, QLinear):
            self.mode = "linear"
        else:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
            patchify = (tuple(m.stride) == tuple(m.weight.shape[2:]) and tuple(m.padding) == (0, 0)
                        and tuple(m.dilation) == (1, 1) and m.groups == 1)
            self.mode = "patchify" if patchify else "conv"
            self.kernel = tuple(m.weight.shape[2:])
        self.input_quant = _activation(f"{name}.input_quant", m.input_quant, plan)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        wq, w = m.weight_quant, m.weight.detach()
        how = plan.decide(f"{name}.weight_quant", wq)
        for buf in ("codes", "w_scale", "w_zero", "correction", "float_weight"):
            self.register_buffer(buf, None)
        if how == "qdq" and self.mode == "conv" and (bool(m.weight_correction) or bool(wq.zero_point.any())):
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
        zero = wq.zero_point.detach().reshape(-1).expand(w.shape[0]).clone()
        if bool(m.weight_correction):
            w_hat = wq.fake_quant(w)
            dims = tuple(range(1, w.dim()))
            a = (w.std(dims) / w_hat.std(dims).clamp_min(1e-12))
            b = w.mean(dims) - w_hat.mean(dims) * a
            scale = scale * a
            self.correction = b.float()
        dtype = _code_dtype(wq.signed)
        self.axis = 0 if self.mode == "conv" else 1
        self.codes = (codes if self.mode == "conv" else codes.reshape(w.shape[0], -1).t()).contiguous().to(dtype)
        self.w_scale, self.w_zero = scale, zero.round().to(dtype)
        plan.weights[f"{name}.weight_quant"] = {"bits": wq.bits, "signed": wq.signed, "shape": list(w.shape)}

    def weight(self) -> torch.Tensor:
        if self.codes is None:
            return self.float_weight
        return _DQFn.apply(self.codes, self.w_scale, self.w_zero, self.axis)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight())
        if self.correction is not None:
            y = y + x.sum(-1, keepdim=True) * self.correction
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "linear":
            return self._matmul(self.input_quant(x))
        if self.mode == "conv":
            return F.conv2d(self.input_quant(x), self.weight(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        B, C, H, W = x.shape  # patchify: [B, C, H, W] -> [B, h*w, C*kh*kw] patches, one MatMul, back to NCHW
        kh, kw = self.kernel
        h, w = H // kh, W // kw
        p = x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw)
        y = self._matmul(self.input_quant(p))
        return y.transpose(1, 2).reshape(B, -1, h, w)


class ExportAttention(nn.Module):
    """vitq's quantized attention with the QDQ pairs right at both matmul inputs: the attention scale is folded
    into q's dequantization scale (or applied after q's float fake quantization) and k is quantized after its
    transpose (the same values: per-tensor or per-head scales are unaffected)."""

    def __init__(self, name: str, m: QAttentionBase, plan: Plan):
        super().__init__()
        self.num_heads, self.qkv, self.proj = m.num_heads, m.qkv, m.proj
        self.window = isinstance(m, QWindowAttention)
        if self.window:
            self.relative_position_bias_table = m.relative_position_bias_table
            self.register_buffer("relative_position_index", m.relative_position_index)
            self.window_area = m.window_area
        self.q_quant = _activation(f"{name}.q_quant", m.q_quant, plan, factor=float(m.scale), per_axis=False)
        self.k_quant = _activation(f"{name}.k_quant", m.k_quant, plan, per_axis=False)
        self.v_quant = _activation(f"{name}.v_quant", m.v_quant, plan, per_axis=False)
        self.score_quant = _activation(f"{name}.score_quant", m.score_quant, plan)
        self.softmax_quant = _activation(f"{name}.softmax_quant", m.softmax_quant, plan)
        # a kind without a QDQ form sees k itself (its fake_quant need not commute with the transpose)
        self.k_before_transpose = isinstance(self.k_quant, FloatFakeQuant)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *_, **__) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        kt = self.k_quant(k).transpose(-2, -1) if self.k_before_transpose else self.k_quant(k.transpose(-2, -1))
        scores = self.q_quant(q) @ kt
        if self.window:
            n = self.window_area
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            scores = scores + bias.permute(2, 0, 1).unsqueeze(0)
            if mask is not None:
                nw, n = mask.shape[0], scores.shape[-1]
                scores = (scores.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0))
                scores = scores.view(-1, self.num_heads, n, n)
        attn = self.softmax_quant(self.score_quant(scores).softmax(dim=-1))
        out = (attn @ self.v_quant(v)).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


def export_module(qmodel: nn.Module, opset: int = DEFAULT_OPSET) -> tuple[nn.Module, Plan]:
    """A copy of ``qmodel`` with every quantizer replaced by its export form (see :class:`Plan`)."""
    import copy

    model = copy.deepcopy(qmodel).cpu().eval()
    plan = Plan(opset)
    for name, m in list(model.named_modules()):
        if isinstance(m, (QLinear, QConv2d)):
            new = ExportWeighted(name, m, plan)
        elif isinstance(m, QAttentionBase):
            new = ExportAttention(name, m, plan)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for name, m in list(model.named_modules()):  # the rest: residual / LayerNorm inputs and any others
        if isinstance(m, FloatFakeQuant):
            continue
        for child_name, child in list(m.named_children()):
            if isinstance(child, Quantizer):
                full = f"{name}.{child_name}" if name else child_name
                setattr(m, child_name, _activation(full, child, plan))
    missing = sorted(set(quantizers_of(qmodel)) - set(plan.how))
    if missing:  # a quantizer inside a module we did not rebuild: keep the model correct by saying so
        raise VitqError(f"quantizers {', '.join(missing[:4])} are inside modules vitq export does not handle")
    return model, plan


# ----------------------------------------------------------------------------------------------- ONNX
def _int4_weights(model_proto) -> int:
    """Give each weight DequantizeLinear whose codes fit in 4 bits its own INT4/UINT4 codes and zero point
    (the TorchScript exporter shares equal initializers through Identity nodes; those left unused go).
    The codes are packed two per byte (ONNX's raw INT4 layout), so the file holds half a byte per weight.

    Not done: opset 21's blocked form of the same weights would let onnxruntime 1.32 fuse DequantizeLinear +
    MatMul into its MatMulNBits kernel, but only when the MatMul's other input is not itself a DequantizeLinear
    output, and here it always is (the quantized activation), so the per-axis form stays."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    ident = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def const(name: str):
        while name in ident:
            name = ident[name]
        return inits.get(name)

    count = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes_t, zero_t = const(node.input[0]), const(node.input[2])
        if codes_t is None or zero_t is None:
            continue
        codes = numpy_helper.to_array(codes_t)
        if codes.dtype not in (np.int8, np.uint8) or codes.size == 0:
            continue
        signed = codes.dtype == np.int8
        lo, hi = (-8, 7) if signed else (0, 15)
        if codes.min() < lo or codes.max() > hi:
            continue
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        zero = numpy_helper.to_array(zero_t)
        for k, arr in ((0, codes), (2, zero)):
            new = helper.make_tensor(f"{node.name}_{'codes' if k == 0 else 'zero'}_4bit", dtype, arr.shape,
                                     _pack_nibbles(arr), raw=True)
            graph.initializer.append(new)
            node.input[k] = new.name
        count += 1
    _prune(graph)
    return count


def _pack_nibbles(arr: np.ndarray) -> bytes:
    """4-bit values as ONNX stores INT4/UINT4 raw data: two per byte, the first in the low nibble (half the
    size of the int32 list ``helper.make_tensor`` would otherwise write as varints)."""
    flat = (arr.astype(np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _prune(graph) -> None:
    """Drop Identity nodes and initializers nothing reads any more."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _to_onnx(emodel: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    torch_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(emodel, (example,), path, dynamo=False, opset_version=torch_opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)


def preprocessing(model: nn.Module) -> dict:
    """The eval preprocessing as plain numbers: resize the shorter side, center crop, normalize."""
    from vitq.data import model_transform

    _, d = model_transform(model)
    h, w = d["input_size"][1:]
    resize = int(np.floor(min(h, w) / d["crop_pct"])) if d["crop_mode"] == "center" else [int(h / d["crop_pct"]),
                                                                                          int(w / d["crop_pct"])]
    return {"input_size": d["input_size"], "resize": resize, "resize_mode": "shorter side", "crop": [h, w],
            "crop_mode": d["crop_mode"], "crop_pct": d["crop_pct"], "interpolation": d["interpolation"],
            "mean": d["mean"], "std": d["std"], "layout": "NCHW, RGB, float32 in [0, 1] before normalizing",
            "timm_transform": d["repr"]}


def sidecar_path(path: str) -> str:
    root, _ = os.path.splitext(path)
    return root + ".preprocess.json"


def export(qmodel: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, int4: bool = True,
           overwrite: bool = False, example: torch.Tensor | None = None, float_model: nn.Module | None = None,
           metadata: dict | None = None) -> dict:
    """Write ``qmodel`` (a prepared, calibrated vitq model) as ONNX QDQ to ``path`` and its preprocessing JSON
    beside it (``NAME.preprocess.json``). Returns what was done: quantizers as QDQ / float / identity, weight
    storage, opset, file size. ``float_model`` (default: ``qmodel``) gives the preprocessing description."""
    onnx = require("onnx")
    path = os.path.abspath(os.fspath(path))
    side = sidecar_path(path)
    if not path.endswith(".onnx"):
        raise VitqError(f"--out {path}: expected a file name ending in .onnx")
    for p in (path, side):
        if os.path.exists(p) and not overwrite:
            raise VitqError(f"output file {p} already exists (expected a new path, or pass --overwrite)")
    if not 10 <= opset <= 23:
        raise VitqError(f"--opset {opset} is not supported (expected 10..23; per-channel QDQ needs {MIN_OPSET}, "
                        "INT4 weights 21)")
    from vitq.state import check_output_parent, make_parents, remove_created

    check_output_parent(path)
    t0 = time.perf_counter()
    emodel, plan = export_module(qmodel, opset)
    if plan.problems:
        more = f" and {len(plan.problems) - 4} more" if len(plan.problems) > 4 else ""
        raise VitqError(f"quantizers not exportable at opset {opset}: {', '.join(plan.problems[:4])}{more} "
                        f"(per-channel QuantizeLinear/DequantizeLinear need --opset {MIN_OPSET} or newer)")
    if example is None:
        c, h, w = preprocessing(float_model if float_model is not None else qmodel)["input_size"]
        example = torch.zeros(1, c, h, w)
    created = make_parents(path)
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp_side = tmp + ".json"
    try:
        with torch.no_grad():
            _to_onnx(emodel, example, tmp, opset)
        proto = onnx.load(tmp)
        if opset > TORCHSCRIPT_MAX_OPSET:
            from onnx import version_converter

            proto = version_converter.convert_version(proto, opset)
        n_int4 = _int4_weights(proto) if (int4 and opset >= 21) else 0
        narrow = {n: w["bits"] for n, w in plan.weights.items() if w["bits"] < 8}
        storage = ("INT4/UINT4 initializers" if n_int4 else "int8/uint8 codes") if narrow else "int8/uint8 codes"
        if narrow and n_int4 < sum(1 for b in narrow.values() if b <= 4) or any(b > 4 for b in narrow.values()):
            storage += "; weights of 5-7 bits (or 4 bits below opset 21) as int8/uint8 codes in their narrower range"
        by = plan.summary()
        info = {"format": "vitq-onnx-1", "opset": opset, "int4_weight_tensors": n_int4, "weight_storage": storage,
                "weight_bits": sorted({w["bits"] for w in plan.weights.values()}),
                "quantizers_qdq": by["qdq"], "quantizers_float": by["float"], "quantizers_identity": by["identity"],
                "float_kinds": sorted({type(q).kind for n, q in quantizers_of(qmodel).items() if n in by["float"]}),
                **(metadata or {})}
        for k, v in {"vitq": json.dumps({k: info[k] for k in ("format", "opset", "weight_storage", "float_kinds")}),
                     "vitq_quantizers_float": ",".join(by["float"])}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        info["file_bytes"] = os.path.getsize(tmp)
        info["seconds"] = time.perf_counter() - t0
        pre = preprocessing(float_model if float_model is not None else qmodel)
        with open(tmp_side, "w") as f:
            json.dump({"preprocessing": pre, "input": "input", "output": "logits", "export": info}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        os.replace(tmp_side, side)
    except BaseException:
        for p in (tmp, tmp_side):
            if os.path.exists(p):
                os.remove(p)
        remove_created(created)
        raise
    info["path"], info["preprocess_json"] = path, side
    return info


# ----------------------------------------------------------------------------------------------- runtimes
class Runner:
    """An exported file in onnxruntime (CPU) or OpenVINO (CPU), called on NCHW float32 batches."""

    def __init__(self, path: str, runtime: str = "onnxruntime", threads: int | None = None,
                 optimized_path: str | None = None):
        self.runtime = runtime
        if runtime == "onnxruntime":
            ort = require("onnxruntime")
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            if optimized_path:
                so.optimized_model_filepath = optimized_path
            so.log_severity_level = 3
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
        elif runtime == "openvino":
            ov = require("openvino")
            core = ov.Core()
            cfg = {"INFERENCE_NUM_THREADS": threads} if threads else {}
            self.compiled = core.compile_model(core.read_model(path), "CPU", cfg)
            self.request = self.compiled.create_infer_request()
        else:
            raise VitqError(f"--runtime {runtime!r} is not supported (expected onnxruntime or openvino)")

    def __call__(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        if self.runtime == "onnxruntime":
            return self.session.run(None, {self.input: x})[0]
        return np.array(self.request.infer([x])[0])


def check(path: str, qmodel: nn.Module, float_model: nn.Module, batches, runtime: str = "onnxruntime",
          progress: bool = True) -> dict:
    """Top-1 of the exported file on labelled batches, its top-1 agreement with the float model and with
    vitq's fake-quantized model, and the largest logit difference from the latter."""
    from tqdm.auto import tqdm

    run = Runner(path, runtime)
    n = top1 = agree_f = agree_q = 0
    q_top1 = 0
    maxdiff = 0.0
    qmodel.eval()
    float_model.eval()
    with torch.no_grad():
        for x, y in tqdm(batches, desc=f"check ({runtime})", disable=not progress, leave=False):
            out = torch.from_numpy(run(x))
            ref, fl = qmodel(x), float_model(x)
            pred = out.argmax(1)
            n += len(y)
            top1 += int((pred == y).sum())
            q_top1 += int((ref.argmax(1) == y).sum())
            agree_f += int((pred == fl.argmax(1)).sum())
            agree_q += int((pred == ref.argmax(1)).sum())
            maxdiff = max(maxdiff, float((out - ref).abs().max()))
    if n == 0:
        raise VitqError("no images to check")
    pct = 100.0 / n
    return {"runtime": runtime, "num_images": n, "top1": top1 * pct, "fake_quant_top1": q_top1 * pct,
            "agreement_float": agree_f * pct, "agreement_fake_quant": agree_q * pct,
            "max_abs_logit_diff": maxdiff}


# ----------------------------------------------------------------------------------------------- CLI
def add_command(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a saved quantized state as an ONNX QDQ model",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", default=None, help="local weights file (.safetensors or .pth) with timm key names")
    p.add_argument("--state", required=True, help="folder written by vitq quantize --out (no calibration is run)")
    p.add_argument("--out", required=True, help="ONNX file to write (NAME.onnx; NAME.preprocess.json beside it)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}: INT4 weights; below 21 they are int8 codes; per-channel "
                        f"quantizers need {MIN_OPSET}+)")
    p.add_argument("--no-int4", action="store_true", help="store weights of <= 4 bits as int8 codes even at opset 21")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--check", action="store_true", help="run the exported file on --val and compare")
    p.add_argument("--val", default=None, help="labelled image folder for --check")
    p.add_argument("--num-val", type=int, default=None, help="seeded choice of N --val images (default all)")
    p.add_argument("--labels", choices=("wnid", "folder"), default="wnid")
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="runtime for --check")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitq.models.loading import create_model, sha256_file
    from vitq.state import load, read_config

    if args.check and args.val is None:
        raise VitqError("--check needs --val DIR (labelled images to run the exported model on)")
    if args.val is not None and not args.check:
        raise VitqError("--val is only used with --check (add --check, or drop --val)")
    require("onnx")
    if args.check:
        require(args.runtime)
    cfg = read_config(args.state)
    if cfg.get("model") not in (None, args.model):
        raise VitqError(f"state {args.state} was made for model {cfg['model']}, not {args.model}")
    model = create_model(args.model, weights=args.weights, pretrained=args.weights is None,
                         **(cfg.get("model_args") or {}))
    qmodel = load(model, args.state)
    meta = {"model": args.model, "weights_sha256": sha256_file(args.weights) if args.weights else None,
            "state": os.path.abspath(args.state), "scheme": cfg.get("scheme"), "method": cfg.get("method"),
            "refine": cfg.get("refine")}
    info = export(qmodel, args.out, opset=args.opset, int4=not args.no_int4, overwrite=args.overwrite,
                  float_model=model, metadata=meta)
    n_q, n_f = len(info["quantizers_qdq"]), len(info["quantizers_float"])
    print(f"wrote {info['path']} ({info['file_bytes'] / 1e6:.2f} MB, opset {info['opset']}) and "
          f"{os.path.basename(info['preprocess_json'])}")
    print(f"{n_q} quantizers as QuantizeLinear/DequantizeLinear; weights: {info['weight_storage']}")
    if n_f:
        kinds = ", ".join(info["float_kinds"])
        print(f"{n_f} quantizers ({kinds}) have no QDQ form and were exported as the float operations of their "
              f"fake quantization: {', '.join(info['quantizers_float'])}")
    if info["quantizers_identity"]:
        print(f"{len(info['quantizers_identity'])} uncalibrated quantizers (the identity) were left out")
    if args.check:
        from vitq.data import make_loader, model_transform, scan_image_folder, select_records

        transform, _ = model_transform(model)
        records = select_records(scan_image_folder(args.val, labels=args.labels), args.num_val, args.seed)
        loader = make_loader(records, transform, batch_size=args.batch_size)
        res = check(info["path"], qmodel, model, loader, args.runtime, progress=not args.quiet)
        print(f"{args.runtime} on {res['num_images']} images: top-1 {res['top1']:.2f} (vitq fake-quant "
              f"{res['fake_quant_top1']:.2f}), agreement with float {res['agreement_float']:.2f} %, with vitq's "
              f"fake-quantized model {res['agreement_fake_quant']:.2f} %, max |logit diff| "
              f"{res['max_abs_logit_diff']:.4f}")
    return 0
