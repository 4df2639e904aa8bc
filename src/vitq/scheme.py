"""Schemes: which tensors are quantized, at how many bits, with which quantizer kind (METHODS.md §0).

``fq`` (FQ-ViT, Evol-Q): weights, every linear input, q/k/v, attention scores, softmax output, LayerNorm
inputs (PTF) and the residual stream after every add. ``matmul`` (PTQ4ViT, APQ-ViT): weights, linear inputs
and the inputs of both attention matmuls; softmax and LayerNorm are computed in float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

from vitq.errors import VitqError
from vitq.targets import KEEP_FLOAT_NAMES, get_target

SCHEMES = {
    "fq": "fully quantized (FQ-ViT/Evol-Q): weights, linear inputs, q/k/v, scores, softmax output, "
          "LayerNorm inputs and residual stream (PTF)",
    "matmul": "PTQ4ViT/APQ-ViT regime: weights, linear inputs and both attention-matmul inputs; "
              "softmax and LayerNorm in float",
}
W_BITS = range(2, 9)
A_BITS = range(3, 9)
DEFAULT_W_BITS = 8
DEFAULT_A_BITS = 8
BASE_KIND = "uniform"  # the quantizer kind of every activation whose kind the scheme does not name
# uses of an activation whose quantizer kind a scheme names -> the scheme field naming it
KIND_FIELDS = {"softmax": "softmax_quantizer", "post_gelu": "gelu_quantizer"}


@dataclass(frozen=True)
class Override:
    """Bits for the quantizers of modules whose qualified name matches ``pattern`` (fnmatch glob)."""

    pattern: str
    w_bits: int | None = None
    a_bits: int | None = None

    @classmethod
    def parse(cls, text: str) -> Override:
        """Parse ``PATTERN:w8a8`` (either part may be left out, e.g. ``head:w8``)."""
        m = re.fullmatch(r"(.+):(?:w(\d+))?(?:a(\d+))?", text.strip())
        if not m or (m.group(2) is None and m.group(3) is None):
            raise VitqError(f"bad override {text!r} (expected PATTERN:wBaB, e.g. 'head:w8a8')")
        return cls(m.group(1), int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None)

    def __str__(self) -> str:
        w = f"w{self.w_bits}" if self.w_bits is not None else ""
        a = f"a{self.a_bits}" if self.a_bits is not None else ""
        return f"{self.pattern}:{w}{a}"


@dataclass(frozen=True)
class Scheme:
    name: str = "fq"
    w_bits: int = DEFAULT_W_BITS
    a_bits: int = DEFAULT_A_BITS
    attn_bits: int | None = None  # softmax-output bits; None = a_bits
    input_bits: int = 8  # image entering the patch embedding
    weight_signed: bool | None = None  # None = scheme default (fq: uint like FQ-ViT, matmul: int)
    softmax_quantizer: str | None = None  # None = "uniform"; log2 / twin / mpq where registered
    attn_granularity: str = "tensor"  # q/k/v quantizers: one scale per "tensor" or per "head"
    overrides: tuple[Override, ...] = field(default_factory=tuple)
    gelu_quantizer: str | None = None  # fc2 input after GELU; None = "uniform"; adalog / twin_gelu where registered
    target: str | None = None  # deployment target (vitq.targets); None = "none", simulation
    keep_float: tuple[str, ...] = ()  # quantizer groups (vitq.targets.KEEP_FLOAT_NAMES) left in float
    search_float: tuple[str, ...] = ()  # those of keep_float a search chose (vitq.search), and which search:
    search_why: str = ""  # e.g. "hago search (--min-speedup 1.50 on onnxruntime)"

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise VitqError(f"unknown scheme {self.name!r} (expected one of {', '.join(SCHEMES)})")
        check_bits("w_bits", self.w_bits, W_BITS)
        check_bits("a_bits", self.a_bits, A_BITS)
        check_bits("attn_bits", self.attn_bits if self.attn_bits is not None else self.a_bits, A_BITS)
        check_bits("input_bits", self.input_bits, A_BITS)
        if self.attn_granularity not in ("tensor", "head"):
            raise VitqError(f"attn_granularity {self.attn_granularity!r} is not supported (expected tensor or head)")
        get_target(self.target)
        kept = self.keep_float.split(",") if isinstance(self.keep_float, str) else self.keep_float
        object.__setattr__(self, "keep_float", tuple(g.strip() for g in kept if g.strip()))
        bad = [g for g in self.keep_float if g not in KEEP_FLOAT_NAMES]
        if bad:
            raise VitqError(f"keep_float group {bad[0]!r} is unknown (expected some of {', '.join(KEEP_FLOAT_NAMES)})")
        object.__setattr__(self, "search_float", tuple(self.search_float))
        stray = [g for g in self.search_float if g not in self.keep_float]
        if stray or (self.search_float and not self.search_why):
            raise VitqError(f"search_float {list(self.search_float)} must be groups of keep_float, with search_why "
                            "saying which search chose them")
        for o in self.overrides:
            if o.w_bits is not None:
                check_bits(f"override {o} weight bits", o.w_bits, W_BITS)
            if o.a_bits is not None:
                check_bits(f"override {o} activation bits", o.a_bits, A_BITS)

    @property
    def fully_quantized(self) -> bool:
        return self.name == "fq"

    @property
    def signed_weights(self) -> bool:
        return self.weight_signed if self.weight_signed is not None else self.name == "matmul"

    @property
    def softmax_kind(self) -> str:
        return self.kind_for("softmax")

    def kind_for(self, use: str) -> str:
        """The quantizer kind of an activation quantizer for ``use``: ``softmax`` (attention probabilities) is
        ``softmax_quantizer``, ``post_gelu`` (the fc2 input after a GELU) is ``gelu_quantizer``; every other use
        (a role such as ``q`` or ``residual``), and a field left at None, is :data:`BASE_KIND`."""
        field_name = KIND_FIELDS.get(use)
        return (getattr(self, field_name) if field_name else None) or BASE_KIND

    def bits_for(self, module_name: str) -> tuple[int, int, int]:
        """(weight bits, activation bits, softmax bits) for the module of that qualified name."""
        w, a, s = self.w_bits, self.a_bits, self.attn_bits if self.attn_bits is not None else self.a_bits
        for o in self.overrides:
            if fnmatch.fnmatchcase(module_name, o.pattern):
                w = o.w_bits if o.w_bits is not None else w
                if o.a_bits is not None:
                    a = s = o.a_bits
        return w, a, s

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = [str(o) for o in self.overrides]
        d["keep_float"] = list(self.keep_float)
        d["search_float"] = list(self.search_float)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        d = dict(d)
        d["overrides"] = tuple(Override.parse(o) for o in d.get("overrides", ()))
        d["keep_float"] = tuple(d.get("keep_float", ()))
        d["search_float"] = tuple(d.get("search_float", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VitqError(f"scheme has unknown fields {sorted(unknown)}")
        return cls(**d)


def check_bits(what: str, value, allowed: range, label: str | None = None) -> None:
    """Refuse bits outside ``allowed``; ``label`` is how the error names the value (default ``what = value``)."""
    if not isinstance(value, int) or value not in allowed:
        label = label or f"{what} = {value!r}"
        raise VitqError(f"{label} is out of range (expected an integer {allowed.start}..{allowed.stop - 1})")
