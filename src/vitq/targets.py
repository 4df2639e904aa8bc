"""Deployment targets: what a runtime executes as fused integer kernels, as data.

A target names, per *quantizer group* (the tensors that feed one kind of integer kernel), whether the runtime
runs that group as an integer kernel and which node its optimized / compiled graph shows for it, or why the
group stays in float there. Under a target (``Scheme.target``, ``--target``), :func:`vitq.prepare.prepare`
builds only the quantizers of groups the target runs as integer kernels, with the quantizer kinds and codes it
runs (uniform, 8-bit codes, signed or unsigned, symmetric or not; TensorRT: symmetric int8, zero point 0); every
other quantizer becomes a ``float`` quantizer (the identity, exported as nothing) and the reason is recorded.

``none`` is simulation: every quantizer the scheme asks for, any kind (what vitq did before targets).

The declarations for onnxruntime and OpenVINO are checked against the runtimes' own graphs by
tests/export/test_targets.py (:mod:`vitq.export.kernels` reads them). They hold for onnxruntime 1.2x-1.3x and
OpenVINO 2024-2026 on x86 CPUs with AVX2 (no VNNI/AMX); OpenVINO on CPUs with AMX may run more of the
attention in int8, which the graph test would then report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitq.errors import VitqError

# quantizer group -> the quantizer roles in it (Quantizer.role). Both inputs of an attention matmul form one
# group: one of them left in float makes the matmul a float one, and the other's rounding is only error.
GROUPS: dict[str, tuple[str, ...]] = {
    "image": ("image",),  # the image entering the patch embedding / stem convolution
    "weight": ("weight",),  # weights of linear and convolution layers (per output channel)
    "linear_input": ("linear_input",),  # input of every linear / convolution (fc2's post-GELU input included)
    "qk": ("q", "k"),  # q·kᵀ
    "attn_v": ("softmax", "v"),  # softmax(scores)·v
    "scores": ("scores",),  # pre-softmax scores (fq)
    "residual": ("residual",),  # residual stream (fq)
    "norm_input": ("norm_input",),  # LayerNorm input (fq, PTF)
}
ROLE_GROUP = {role: g for g, roles in GROUPS.items() for role in roles}
# groups split by where their quantizers sit, so the search (vitq.search) and keep_float can choose finer:
# ``linear_input.post_gelu`` (fc2's input after a GELU), ``linear_input.head`` (the classifier's input) and
# ``linear_input.other`` (every other linear / convolution input). The group's own name still means all of it.
SPLITS: dict[str, tuple[str, ...]] = {"linear_input": ("post_gelu", "head", "other")}
UNITS = tuple(f"{g}.{part}" for g, parts in SPLITS.items() for part in parts)
KEEP_FLOAT_NAMES = (*GROUPS, *UNITS)  # what keep_float may name


@dataclass(frozen=True)
class Target:
    """One deployment target. ``integer``: group -> the integer kernel the runtime runs for it (node type in
    its optimized graph); ``floating``: group -> why it stays float there. Every group is in exactly one."""

    name: str
    runtime: str | None  # the runtime that runs the exported file (None: simulation only)
    description: str
    integer: dict[str, str] = field(default_factory=dict)
    floating: dict[str, str] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("uniform",)  # quantizer kinds with a QDQ form the kernels take
    max_bits: int = 8  # activation codes wider than this have no integer kernel
    int_weight_bits: int = 8  # weights narrower than this are dequantized to float before a float matmul
    signed_activations: bool | None = None  # True: activations must be signed (int8); None: either
    symmetric_activations: bool = False  # True: zero point 0 (TensorRT)
    symmetric_weights: bool = True  # per-channel weights with zero point 0
    per_head_attention: bool = False  # per-head (per-axis) q/k/v QDQ pairs fuse into the attention matmul
    symmetric_qk: bool = False  # q and k must be signed symmetric for q·kᵀ to run as an integer kernel
    formats: tuple[str, ...] = ("onnx",)  # what `vitq export --format` writes for it
    nbits_kernel: str | None = None  # the fused kernel that runs weights of <= 4 bits (vitq export writes it)

    def __post_init__(self):
        both = set(self.integer) & set(self.floating)
        missing = set(GROUPS) - set(self.integer) - set(self.floating)
        if both or missing or set(self.integer) - set(GROUPS) or set(self.floating) - set(GROUPS):
            raise ValueError(f"target {self.name}: every group in exactly one of integer / floating "
                             f"(both: {sorted(both)}, missing: {sorted(missing)})")

    @property
    def simulation(self) -> bool:
        return self.runtime is None

    def group_reason(self, group: str) -> str | None:
        """Why ``group`` is kept in float under this target (None: it runs as an integer kernel)."""
        return None if group in self.integer else self.floating[group]


_MATMUL = "QDQ around MatMul/Gemm"
TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


register_target(Target(
    "none", None, "simulation: every quantizer of the scheme, any kind, computed in float (fake quantization)",
    integer=dict.fromkeys(GROUPS, "fake quantization"), kinds=(), max_bits=8, int_weight_bits=2,
    symmetric_weights=False, per_head_attention=True, formats=("onnx", "openvino")))

register_target(Target(
    "onnxruntime", "onnxruntime",
    "onnxruntime (CPU execution provider): QDQ around MatMul/Gemm/Conv fused into integer kernels, "
    "u8 or s8 activations with any zero point, s8 per-channel symmetric weights",
    integer={"image": "MatMulIntegerToFloat (patchify) / QLinearConv", "weight": "int8 per-channel B of the kernel",
             "linear_input": "MatMulIntegerToFloat / QLinearConv", "qk": "MatMulIntegerToFloat",
             "attn_v": "QLinearMatMul"},
    nbits_kernel="MatMulNBits (com.microsoft, 4-bit blocks)",
    floating={"scores": "the pre-softmax scores feed Softmax, which has no integer kernel in the CPU provider "
                        "for a QDQ pair on its input alone: the pair only rounds",
              "residual": "the residual add runs in float: a QDQ pair on the stream only rounds",
              "norm_input": "LayerNormalization has no integer kernel: a QDQ pair on its input only rounds"},
    formats=("onnx",)))

register_target(Target(
    "openvino", "openvino",
    "OpenVINO CPU plugin: FakeQuantize (QDQ) around MatMul/Conv fused into u8/i8 FullyConnected / Convolution; "
    "q·kᵀ an i8 MatMul when q and k are symmetric; softmax·v in f32",
    integer={"image": "FullyConnected u8 (patchify) / Convolution u8", "weight": "i8/u8 per-channel weights",
             "linear_input": "FullyConnected u8 / Convolution u8",
             "qk": "MatMul i8 (q and k signed symmetric: with an asymmetric q or k OpenVINO fuses q·kᵀ → softmax "
                   "→ ·v into one MHA snippet that runs in f32 on AVX2, jit_avx2_f32)"},
    floating={"attn_v": "softmax·v runs as an f32 MatMul (a quantized softmax output and v only add FakeQuantize "
                        "steps; NNCF's transformer preset leaves them float too)",
              "scores": "Softmax runs in f32", "residual": "the residual add runs in f32",
              "norm_input": "MVN (LayerNorm) runs in f32"},
    symmetric_qk=True, formats=("onnx", "openvino")))

register_target(Target(
    "tensorrt", "tensorrt",
    "TensorRT (explicit quantization): QDQ with symmetric int8 (zero point 0) around MatMul/Conv and the "
    "attention matmuls; declared from NVIDIA's documented rules, not checked here (no TensorRT installed)",
    integer={"image": "int8 Convolution / MatMul", "weight": "int8 per-channel symmetric",
             "linear_input": "int8 MatMul / Convolution", "qk": "int8 MatMul (fused MHA where the plugin allows)",
             "attn_v": "int8 MatMul"},
    floating={"scores": "Softmax runs in float/half", "residual": "the residual add runs in float/half",
              "norm_input": "LayerNorm runs in float/half"},
    signed_activations=True, symmetric_activations=True, formats=("onnx",)))


def get_target(name: str | None) -> Target:
    """The registered target of that name (None: ``none``)."""
    name = name or "none"
    if name not in TARGETS:
        raise VitqError(f"unknown target {name!r} (expected one of {', '.join(TARGETS)})")
    return TARGETS[name]


def float_reason(target: Target, role: str, kind: str, bits: int, per_axis: bool, keep_float: tuple[str, ...],
                 signed: bool | None = None) -> str | None:
    """Why a quantizer of ``role`` / ``kind`` / ``bits`` is kept in float under ``target`` (None: it is built).
    ``keep_float``: groups the scheme (a recipe or the search) keeps in float on top of the target's rules."""
    group = ROLE_GROUP.get(role)
    if group is None:
        return None if target.simulation else f"role {role!r} has no integer kernel declared for {target.name}"
    if group in keep_float:
        return f"group {group} kept in float by the scheme (keep_float)"
    if target.simulation or role == "weight":
        return None  # weights: always quantized (their bits decide the kernel; see weight_note)
    why = target.group_reason(group)
    if why:
        return why
    if kind not in target.kinds:
        return f"quantizer kind {kind!r} has no integer kernel in {target.name} (its QDQ-less form is float ops)"
    if bits > target.max_bits:
        return f"{bits}-bit codes have no integer kernel in {target.name}"
    if per_axis and group in ("qk", "attn_v") and not target.per_head_attention:
        return f"per-head quantizers at an attention matmul do not fuse in {target.name}"
    return None


def weight_note(target: Target, w_bits: int) -> str | None:
    """What the target does with weights of ``w_bits`` (None: integer kernels)."""
    if target.simulation or w_bits >= target.int_weight_bits:
        return None
    if target.nbits_kernel and w_bits <= 4:
        return (f"W{w_bits} weights: {target.name} runs them as {target.nbits_kernel}; `vitq export --target "
                f"{target.name}` writes that node (float compute by default, --matmulnbits int8 for int8); a "
                "speed-up over float depends on the CPU (benchmarks/bench_w4.py)")
    return (f"W{w_bits} weights: {target.name} has no integer kernel for them on this CPU; they are stored "
            f"packed (smaller file) and dequantized to float before a float matmul (slower than float)")


def describe(target: Target) -> str:
    """The declaration as text (``vitq recipes --target``)."""
    lines = [f"target {target.name}: {target.description}"]
    for g in GROUPS:
        if g in target.integer:
            lines.append(f"    {g:13s} integer: {target.integer[g]}")
        else:
            lines.append(f"    {g:13s} float:   {target.floating[g]}")
    if not target.simulation:
        act = "signed symmetric int8" if target.symmetric_activations else "u8/s8, any zero point"
        lines.append(f"    kinds {', '.join(target.kinds)}; activations {act}; weights per channel, "
                     f"{'symmetric' if target.symmetric_weights else 'any zero point'}, integer at "
                     f"{target.int_weight_bits} bits")
    return "\n".join(lines)
