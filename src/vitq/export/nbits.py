"""Weights of 4 bits or fewer as onnxruntime's ``MatMulNBits`` (``com.microsoft`` domain): the export form of a
W4 model that onnxruntime runs as one fused kernel per linear layer, whatever feeds its first input.

The plain QDQ file (:mod:`vitq.export.onnx`) stores such weights as INT4 codes -> DequantizeLinear -> MatMul.
onnxruntime 1.32 fuses that into MatMulNBits (block size 32, int8 compute) only when the MatMul's other input
is not itself a DequantizeLinear output, i.e. for weight-only models; with a quantized activation (W4A8) the
weights are dequantized to float on every run before a float MatMul. This rewrite writes the node itself:

- B: the codes as unsigned 4-bit values, ``[N, blocks, block_size / 2]`` bytes, K split into blocks (a power of
  two >= 16, which the kernel requires; :func:`block_size`); vitq's per-output-channel scale (one block of length
  K) is repeated in every block, so the dequantized weight is exactly vitq's. Signed codes c in [-8, 7]
  are stored as c + 8 with zero point z + 8 (the same values); a K that is not a multiple of the block is padded
  with the zero point (weight 0).
- scales ``[N * blocks]`` float, zero points packed two per byte (left out where every one is 8, the kernel's
  default).
- ``accuracy_level``: ``float`` compute (1: A stays float, the values of vitq's fake-quantized model) or ``int8``
  (4: A is quantized to int8 per block at run time, the setting onnxruntime's own fusion chooses; a W4A8-dynamic
  model).
"""

from __future__ import annotations

import numpy as np

BLOCK_SIZE = 32  # int8 compute: what onnxruntime's own DequantizeLinear -> MatMul fusion picks (A is quantized
MAX_BLOCK = 256  # per block, so a short block keeps its error small); float compute: up to this, see block_size
COMPUTE = {"float": 1, "int8": 4}  # --nbits-compute -> MatMulNBits accuracy_level
DOMAIN = "com.microsoft"


def _pack_rows(codes: np.ndarray) -> np.ndarray:
    """uint8 values in 0..15, last axis of even length -> two per byte, the first in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def block_size(K: int, compute: str) -> int:
    """The block of a K-long weight column: ``BLOCK_SIZE`` for int8 compute; for float compute, where the block
    only repeats the channel's scale, the largest power of two dividing K (16 to ``MAX_BLOCK``; 16 if none does),
    so that the repeated scales stay a small part of the file (DeiT-Tiny: K 192 -> 64, 768 -> 256)."""
    if compute == "int8":
        return BLOCK_SIZE
    b = MAX_BLOCK
    while b > 16 and K % b:
        b //= 2
    return b


def nbits_weights(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, block: int = BLOCK_SIZE):
    """MatMulNBits' B, scales and zero points (None where all are 8) for a MatMul weight given as integer
    ``codes`` ``[K, N]`` with per-output-channel ``scale`` / ``zero`` ``[N]`` (DequantizeLinear axis 1)."""
    K, N = codes.shape
    signed = codes.dtype == np.int8
    shift = 8 if signed else 0
    u = codes.astype(np.int16).T + shift  # [N, K]
    z = np.broadcast_to(np.round(zero.astype(np.float64)).astype(np.int16).reshape(-1), (N,)) + shift
    if u.min() < 0 or u.max() > 15 or z.min() < 0 or z.max() > 15:
        raise ValueError("weight codes or zero points outside 4 bits")
    blocks = -(-K // block)
    padded = np.repeat(z[:, None], blocks * block, axis=1)
    padded[:, :K] = u
    b = _pack_rows(padded.reshape(N, blocks, block).astype(np.uint8))
    scales = np.repeat(np.broadcast_to(scale.astype(np.float32).reshape(-1), (N,))[:, None], blocks, axis=1)
    zeros = None
    if not np.all(z == 8):
        zb = np.repeat(z[:, None], blocks + blocks % 2, axis=1).astype(np.uint8)  # even length to pack
        zeros = _pack_rows(zb).reshape(-1)
    return b, scales.reshape(-1), zeros


def to_matmulnbits(model_proto, compute: str = "float", block: int | None = None) -> int:
    """Rewrite every DequantizeLinear (int8/uint8 codes within 4 bits, per output channel, axis 1 of a 2-D
    ``[K, N]`` weight) whose output is only a MatMul's second input into one MatMulNBits node with the MatMul's
    name (``block``: the block size, default :func:`block_size`). Returns how many were rewritten. Run it before
    the INT4 packing of the remaining weights."""
    from onnx import helper, numpy_helper

    if compute not in COMPUTE:
        raise ValueError(f"compute {compute!r} (expected one of {', '.join(COMPUTE)})")
    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    ident = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}

    def const(name: str):
        while name in ident:
            name = ident[name]
        t = inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    count = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]:
        users = readers.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or dq.output[0] in outputs:
            continue
        mm = users[0]
        if list(mm.input).index(dq.output[0]) != 1:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        codes, scale, zero = (const(i) for i in dq.input)
        if codes is None or scale is None or zero is None or codes.ndim != 2 or axis not in (1, -1):
            continue
        if codes.dtype not in (np.int8, np.uint8) or scale.size not in (1, codes.shape[1]):
            continue
        lo, hi = (-8, 7) if codes.dtype == np.int8 else (0, 15)
        if codes.min() < lo or codes.max() > hi:
            continue
        K, N = codes.shape
        blk = block or block_size(K, compute)
        try:
            b, scales, zeros = nbits_weights(codes, scale, zero, blk)
        except ValueError:
            continue
        base = mm.name or dq.output[0]
        names = [f"{base}_nbits_B", f"{base}_nbits_scales"] + ([f"{base}_nbits_zero"] if zeros is not None else [])
        arrays = [b, scales] + ([zeros] if zeros is not None else [])
        for name, arr in zip(names, arrays):
            graph.initializer.append(numpy_helper.from_array(arr, name))
        node = helper.make_node("MatMulNBits", [mm.input[0], *names], [mm.output[0]], name=mm.name, domain=DOMAIN,
                                K=K, N=N, bits=4, block_size=blk, accuracy_level=COMPUTE[compute])
        at = list(graph.node).index(mm)
        graph.node.remove(mm)
        graph.node.insert(at, node)
        graph.node.remove(dq)
        count += 1
    if count and not any(o.domain == DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count
