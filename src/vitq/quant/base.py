"""Fake quantizers: modules that map a float tensor to the nearest value a b-bit integer code can represent.

Every quantizer keeps its parameters (scale, zero point, ...) in buffers, so a model's ``state_dict()`` is the
whole quantization result. A quantizer that has not been calibrated is the identity; while an observer is
attached (see :mod:`vitq.quant.observers`) it records what flows through and passes it on unchanged.

Kinds are registered by name (:data:`QUANTIZER_KINDS`); each kind lives in its own module of :mod:`vitq.quant`
(uniform, PTF and log2 in :mod:`vitq.quant.uniform`) and registers when the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vitq.errors import VitqError

EPS = 1e-8
QUANTIZER_KINDS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.kind = name
        QUANTIZER_KINDS[name] = cls
        return cls

    return deco


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass (straight-through)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.round(x)  # same values, two fewer elementwise passes
    return x + (torch.round(x) - x).detach()


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class Quantizer(nn.Module):
    """Base class. ``role`` says which tensor it quantizes (weight, linear_input, q, k, v, scores, softmax,
    residual, norm_input, image); methods choose what to do per role."""

    kind = "base"

    def __init__(self, bits: int, role: str):
        super().__init__()
        self.bits = int(bits)
        self.role = role
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.observer = None  # set only inside vitq.quant.observers.observing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not bool(self.initialized):
            return x
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)

    def init_kwargs(self) -> dict:
        """Constructor arguments beyond (bits, role), so a saved quantizer can be rebuilt by kind."""
        return {}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}, role={self.role}"


def make_quantizer(kind: str, bits: int, role: str, **kwargs) -> Quantizer:
    """A quantizer of a registered kind (every kind of :mod:`vitq.quant` registers when the package is imported)."""
    try:
        cls = QUANTIZER_KINDS[kind]
    except KeyError:
        raise VitqError(f"unknown quantizer kind {kind!r} (expected one of {sorted(QUANTIZER_KINDS)})") from None
    return cls(bits, role, **kwargs)


def quantizers_of(model: nn.Module) -> dict[str, Quantizer]:
    """All quantizers of a prepared model by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


class _Nothing:
    """An 'observer' that records nothing: while attached, a quantizer passes its input through unchanged."""

    def update(self, x: torch.Tensor) -> None:
        pass


@contextmanager
def passthrough(target: nn.Module | Iterable[Quantizer]) -> Iterator[None]:
    """Inside the block the quantizers of ``target`` (a model or module, or the quantizers themselves) are the
    identity, so the model computes in float; whatever was attached to them before is restored afterwards."""
    qs = list(quantizers_of(target).values()) if isinstance(target, nn.Module) else list(target)
    saved = [q.observer for q in qs]
    tap = _Nothing()
    for q in qs:
        q.observer = tap
    try:
        yield
    finally:
        for q, obs in zip(qs, saved, strict=True):
            q.observer = obs
