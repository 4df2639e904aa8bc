"""The layer-wise capture engine of the per-layer searches (PTQ-ViT, EasyQuant): which operations are searched,
and their inputs recorded over the calibration images, segment by segment.

- :func:`find_layers`: the searched operations in execution order: every weighted layer (input × weight), and in
  every attention (:class:`~vitq.quant.modules.QAttentionBase`) the two matmuls q·kᵀ (q × k) and attn·V (softmax
  output × v), placed just before the attention's output projection.
- :func:`segments`: the model cut into stem, trunk units (blocks / stages) and tail, each with its layers, so that
  the inputs of one unit can be computed once and passed on.
- :func:`record`: run a segment over a list of batches with :class:`Recorder` hooks that cache each layer's
  operands (a seeded random subset of ``tokens`` token positions per sample for a weighted layer, of ``rows``
  query rows per sample and head for a matmul; all keys / values) and the range of the full tensors.
- :func:`image_chunks` and :func:`run_segment`: the calibration images as batches, and a segment run over them.

The model computes in float inside :func:`vitq.quant.base.passthrough`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk
from vitq.quant.base import Quantizer, passthrough
from vitq.quant.modules import QAttentionBase, QConv2d, QWeighted


@dataclass
class Layer:
    """One searched operation: ``kind`` linear (input A, weight B), qk (q, k) or av (softmax output, v)."""

    name: str
    kind: str
    module: nn.Module  # the weighted layer, or the attention module for qk / av
    a_attr: tuple[nn.Module, str]  # (parent, attribute) of the A-side quantizer
    b_attr: tuple[nn.Module, str]
    idx: torch.Tensor | None = None  # sampled token / row positions
    cache: dict = field(default_factory=dict)

    @property
    def a_quant(self) -> Quantizer:
        return getattr(*self.a_attr)

    @property
    def b_quant(self) -> Quantizer:
        return getattr(*self.b_attr)

    @property
    def block_part(self) -> str:
        return "mlp" if ".mlp." in f".{self.name}." else "msa" if ".attn" in f".{self.name}" else "other"

    def quantizer_name(self, attr: str) -> str:
        """The qualified name of the quantizer at ``attr`` (an attribute of the layer, or of its attention)."""
        owner = self.name if self.kind == "linear" else self.name.rpartition(".")[0]
        return f"{owner}.{attr}" if owner else attr


def find_layers(model: nn.Module) -> list[Layer]:
    """Searched layers in execution order: every weighted layer, and in every attention the matmuls q·kᵀ and
    attn·V just before its output projection ``proj`` (qkv, QKᵀ, attn·V, proj). An attention whose ``proj`` is
    not a weighted layer of the model is refused (its matmuls could not be placed in that order)."""
    layers: list[Layer] = []
    placed: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, QWeighted):
            continue
        if isinstance(m, QConv2d) and m.groups != 1:
            raise VitqError(f"grouped convolution {name} ({type(m).__name__}, groups={m.groups}) is not supported by "
                            "the layer-wise search (expected groups=1)")
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else None
        if isinstance(parent, QAttentionBase) and getattr(parent, "proj", None) is m:
            layers.append(Layer(f"{parent_name}.matmul_qk", "qk", parent, (parent, "q_quant"), (parent, "k_quant")))
            layers.append(Layer(f"{parent_name}.matmul_av", "av", parent, (parent, "softmax_quant"),
                                (parent, "v_quant")))
            placed.add(id(parent))
        layers.append(Layer(name, "linear", m, (m, "input_quant"), (m, "weight_quant")))
    for name, m in model.named_modules():
        if isinstance(m, QAttentionBase) and id(m) not in placed:
            raise VitqError(f"attention {name} ({type(m).__name__}): its output projection is not a weighted layer "
                            "inside it, so the layer-wise search cannot place its matmuls (expected a QWeighted "
                            "proj child)")
    return layers


def tokens_of(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """A weighted layer's input as [samples, tokens, features] (a conv's input as unfolded patches)."""
    m = layer.module
    if isinstance(m, QConv2d):
        k = m.weight.shape[-2:]
        return F.unfold(x, k, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def weight_matrix(m: QWeighted) -> torch.Tensor:
    """A weighted layer's weight as a float matrix [out, in·k·k]."""
    return m.weight.detach().reshape(m.weight.shape[0], -1).float()


class _Stop(Exception):
    pass


class Recorder:
    """Forward pre-hooks that record (subsampled) inputs of one or more layers during a segment forward, into
    ``layer.cache[tag]``: ``A`` and ``B`` (the operands, concatenated over batches on exit; B only for the
    matmuls), ``amax_A`` / ``amax_B`` (the largest |value| of the full tensors) and ``min_A`` / ``max_A``.

    ``stop``: raise out of the forward once every layer has been seen (see :func:`record`). ``first``: the first
    token position is always among the sampled ones (a ViT's class token, the only one its head reads)."""

    def __init__(self, layers: list[Layer], tag: str, gen: torch.Generator, stop: bool, *, tokens: int,
                 rows: int, first: bool = False):
        self.layers, self.tag, self.gen, self.stop = layers, tag, gen, stop
        self.tokens, self.rows, self.first = tokens, rows, first
        self.handles = []
        self.pending: set = set()

    def _idx(self, layer: Layer, n: int, keep: int) -> torch.Tensor:
        if layer.idx is None:
            if n <= keep:
                layer.idx = torch.arange(n)
            elif self.first:
                layer.idx = torch.cat([torch.zeros(1, dtype=torch.long),
                                       1 + torch.randperm(n - 1, generator=self.gen)[:keep - 1].sort().values])
            else:
                layer.idx = torch.randperm(n, generator=self.gen)[:keep].sort().values
        return layer.idx

    def _store(self, layer: Layer, side: str, x: torch.Tensor, full: torch.Tensor) -> None:
        store = layer.cache.setdefault(self.tag, {"A": [], "B": [], "amax_A": 0.0, "amax_B": 0.0, "min_A": 0.0,
                                                  "max_A": 0.0})
        store[side].append(x.detach().float())
        mn, mx = (float(v) for v in torch.aminmax(full))  # one pass; |x|max follows from the two ends
        store[f"amax_{side}"] = max(store[f"amax_{side}"], -mn, mx)
        if side == "A":  # the full tensor's range, for an asymmetric input grid
            store["min_A"] = min(store["min_A"], mn)
            store["max_A"] = max(store["max_A"], mx)
        self.pending.discard((layer.name, side))
        if self.stop and not self.pending:
            raise _Stop

    def _hook(self, layer: Layer, side: str):
        def hook(_module, args):
            x = args[0].detach()
            if layer.kind == "linear":
                t = tokens_of(layer, x.float())
                t = t[:, self._idx(layer, t.shape[1], self.tokens).to(t.device)]
            elif side == "A":  # q rows or softmax rows [S, H, N, *]
                t = x[:, :, self._idx(layer, x.shape[2], self.rows).to(x.device)]
            else:  # k or v, all tokens
                t = x
            self._store(layer, side, t, x)
        return hook

    def __enter__(self):
        for layer in self.layers:
            if layer.kind == "linear":
                self.handles.append(layer.module.register_forward_pre_hook(self._hook(layer, "A")))
                self.pending.add((layer.name, "A"))
            else:
                self.handles.append(layer.a_quant.register_forward_pre_hook(self._hook(layer, "A")))
                self.handles.append(layer.b_quant.register_forward_pre_hook(self._hook(layer, "B")))
                self.pending |= {(layer.name, "A"), (layer.name, "B")}
        self._all = set(self.pending)
        return self

    def reset(self):
        self.pending = set(self._all)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            store = layer.cache.get(self.tag)
            if store is not None and isinstance(store["A"], list):
                store["A"] = torch.cat(store["A"]) if store["A"] else None
                store["B"] = torch.cat(store["B"]) if store["B"] else None
        return False


Segment = tuple[str, Callable, list[Layer]]


def segments(model: nn.Module, layers: list[Layer], probe: torch.Tensor) -> list[Segment]:
    """(name, function, its layers) for the stem, every trunk unit and the tail, in order. A layer outside
    every unit belongs to the stem when it runs in the stem on ``probe`` (one image is enough), else to the
    tail; so any family's stem (a patch embedding, a CNN's first convolutions) is found without its names."""
    trunk = Trunk(model)
    segs: list[Segment] = [("stem", trunk.stem, [])]
    segs += [(n, m, []) for n, m in trunk.units]
    segs.append(("tail", trunk.tail, []))
    outside = []
    for layer in layers:
        for seg in segs[1:-1]:
            if layer.name.startswith(seg[0] + "."):
                seg[2].append(layer)
                break
        else:
            outside.append(layer)
    in_stem: set[int] = set()
    hooks = [la.module.register_forward_pre_hook(lambda m, args: in_stem.add(id(m))) for la in outside]
    try:
        with torch.no_grad(), passthrough(model):
            trunk.stem(probe[:1])
    finally:
        for h in hooks:
            h.remove()
    for layer in outside:
        (segs[0] if id(layer.module) in in_stem else segs[-1])[2].append(layer)
    return segs


def run_segment(fn, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A segment's outputs for each batch of inputs."""
    return [fn(h) for h in hs]


def record(fn, hs: list[torch.Tensor], layers: list[Layer], tag: str, gen: torch.Generator, *, tokens: int,
           rows: int, stop: bool, keep_output: bool = True, first: bool = False) -> list[torch.Tensor] | None:
    """Run ``fn`` over the batches ``hs`` recording the layers' operands under ``tag`` (see :class:`Recorder`);
    the outputs when ``keep_output``. With ``stop`` each batch's forward ends once every layer was seen."""
    outs = []
    with Recorder(layers, tag, gen, stop, tokens=tokens, rows=rows, first=first) as rec:
        for h in hs:
            rec.reset()
            try:
                y = fn(h)
                if keep_output:
                    outs.append(y)
            except _Stop:
                pass
    return outs if keep_output else None


def image_chunks(calib: CalibData, n: int | None) -> list[torch.Tensor]:
    """The first ``n`` calibration images (all when None) as batches on the calibration device."""
    imgs = calib.images if n is None else calib.images[:n]
    return [imgs[i:i + calib.batch_size].to(calib.device) for i in range(0, len(imgs), calib.batch_size)]
