"""Full float32 for searches and evaluations: TF32 (and the reduced-precision float32 modes of oneDNN) off
inside a ``with full_float32():`` block, the caller's settings restored afterwards.

PyTorch has two APIs for this. The legacy flags ``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32``, and the newer ``fp32_precision`` attributes (``torch.backends``,
``.cuda.matmul``, ``.cudnn``, ``.cudnn.conv``, ``.cudnn.rnn``, ``.mkldnn`` and its ``matmul/conv/rnn``; values
"ieee", "tf32", "bf16", "none" = inherit). Once a program sets the new ones, *reading* a legacy flag raises a
RuntimeError, so this module never relies on the legacy getters alone: it saves every ``fp32_precision`` it
finds and the legacy flags that can still be read, sets everything to IEEE float32, and restores the new
settings first and then, where a legacy flag that was readable no longer reads the same, that flag (which
keeps it readable, as it was).
On a torch without the new API only the legacy flags are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# parents before children: restoring a parent may re-propagate to children, so children are restored after it
_NEW_API = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
            "mkldnn.rnn")
_LEGACY = ("cudnn", "cuda.matmul")


def _obj(path: str):
    o = torch.backends
    for part in filter(None, path.split(".")):
        o = getattr(o, part, None)
        if o is None:
            return None
    return o


def _new_api_objects() -> list[tuple[str, object]]:
    out = []
    for path in _NEW_API:
        o = _obj(path)
        if o is not None and hasattr(o, "fp32_precision"):
            out.append((path, o))
    return out


def _read_legacy(path: str) -> bool | None:
    """The legacy ``allow_tf32`` flag, or None where it cannot be read (new API in use) or does not exist."""
    o = _obj(path)
    if o is None:
        return None
    try:
        return bool(o.allow_tf32)
    except (RuntimeError, AttributeError):
        return None


def precision_settings() -> dict:
    """Every float32-precision setting this module manages, as it reads now (for records and tests):
    ``{"fp32_precision": {path: value}, "allow_tf32": {path: bool or None (unreadable)}}``."""
    return {"fp32_precision": {p or "backends": o.fp32_precision for p, o in _new_api_objects()},
            "allow_tf32": {p: _read_legacy(p) for p in _LEGACY}}


def tf32_in_use() -> bool:
    """True when any managed setting allows a reduced-precision float32 mode (tf32 or bf16)."""
    s = precision_settings()
    return any(v in ("tf32", "bf16") for v in s["fp32_precision"].values()) or any(s["allow_tf32"].values())


@contextmanager
def full_float32() -> Iterator[None]:
    """No TF32/bf16 for float32 inside (cuBLAS, cuDNN, oneDNN); every setting restored afterwards.

    A search ranks candidates by fitness differences of ~1e-3, and the TF32 round-off a GPU applies by default
    to convolutions (the patch embedding) moves the fitness by as much; an evaluation of a model searched in
    float32 should see the same arithmetic."""
    objs = _new_api_objects()
    saved_new = [(o, o.fp32_precision) for _, o in objs]
    saved_legacy = [(path, _read_legacy(path)) for path in _LEGACY]
    try:
        if objs:
            for _, o in objs:
                o.fp32_precision = "ieee"
        else:
            for path, _ in saved_legacy:
                o = _obj(path)
                if o is not None:
                    o.allow_tf32 = False
        yield
    finally:
        for o, v in saved_new:
            o.fp32_precision = v
        for path, v in saved_legacy:  # only where the new settings did not already give the flag back
            if v is not None and _read_legacy(path) != v:
                _obj(path).allow_tf32 = v
