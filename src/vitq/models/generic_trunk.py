"""The block-wise view (stem → units → tail) of a model no dedicated family knows, found from the model's
own block lists and checked on one forward pass.

Units come from the first of the model's containers in :data:`CONTAINERS` (``stages``, ``blocks``,
``layers``, ...) whose children run as a chain: each called once, in order, each one's input the previous one's
output. A unit is then replaced by its own children wherever they form a chain from the unit's input to its
output (a stage becomes its downsampling and its blocks; a residual block stays whole, its output is not its
last child's). Stem and tail are the model's own forward: the stem runs it until the first unit's input; the
tail runs it with the units replaced by a feed of the given tensor (the stem then runs on zeros of the
traced image size), so ``tail(units(stem(x)))`` is ``model(x)``, which is checked once on a traced input.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError

CONTAINERS = ("stages", "blocks", "layers", "network", "features", "levels", "encoder", "body")
_MAX_DEPTH = 3


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__("stem reached the first unit")
        self.value = value


class _Feed(nn.Module):
    """Stands in for a unit while the tail runs: the first returns the fed tensor, the others pass it on."""

    def __init__(self, value: torch.Tensor | None):
        super().__init__()
        self.value = value

    def forward(self, x, *args, **kwargs):
        return self.value if self.value is not None else x


@torch.no_grad()
def _record(model: nn.Module, roots: list[nn.Module], example: torch.Tensor) -> dict:
    """One forward recording every call of every module under ``roots``: [(start, end, input, output)]."""
    calls: dict[nn.Module, list] = {}
    clock = [0]
    hooks = []

    def pre(mod, args, kwargs):
        clock[0] += 1
        alone = len(args) == 1 and not kwargs  # a unit must run on its input alone
        calls.setdefault(mod, []).append([clock[0], None, args[0] if alone else None, None])

    def post(mod, args, out):
        clock[0] += 1
        rec = calls[mod][-1]
        rec[1], rec[3] = clock[0], out if isinstance(out, torch.Tensor) else None

    for root in roots:
        for m in root.modules():
            hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _chain(mods: list[nn.Module], calls: dict, start=None, end=None) -> bool:
    """Whether ``mods`` ran once each, in order, each fed the previous one's output (the first fed ``start``
    and the last giving ``end`` where those are given)."""
    prev_out, prev_end = start, 0
    for i, m in enumerate(mods):
        c = calls.get(m, [])
        if len(c) != 1 or c[0][2] is None or c[0][3] is None:
            return False
        t0, t1, inp, out = c[0]
        if t0 < prev_end or (prev_out is not None and inp is not prev_out):
            return False
        if i == 0 and start is not None and inp is not start:
            return False
        prev_out, prev_end = out, t1
    return end is None or prev_out is end


def _expand(name: str, unit: nn.Module, calls: dict, depth: int) -> list[tuple[str, nn.Module]]:
    """``unit``, or its children (recursively) where they run as a chain from its input to its output."""
    kids = [(f"{name}.{n}", c) for n, c in unit.named_children() if calls.get(c) and not isinstance(c, nn.Identity)]
    if depth >= _MAX_DEPTH or len(kids) < 2 or any(not list(c.children()) for _, c in kids):
        return [(name, unit)]
    _, _, inp, out = calls[unit][0]
    if not _chain([c for _, c in kids], calls, inp, out):
        return [(name, unit)]
    return [u for n, c in kids for u in _expand(n, c, calls, depth + 1)]


def find_units(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The units of ``model`` (see the module docstring); [] when none of its containers forms a chain."""
    roots = [(n, getattr(model, n)) for n in CONTAINERS if isinstance(getattr(model, n, None), nn.Module)]
    if not roots:
        return []
    calls = _record(model, [r for _, r in roots], example)
    for name, root in roots:
        kids = [(f"{name}.{n}", c) for n, c in root.named_children() if calls.get(c)]
        if len(kids) >= 2 and _chain([c for _, c in kids], calls):
            return [u for n, c in kids for u in _expand(n, c, calls, 1)]
    return []


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, attr)
    if isinstance(owner, (nn.ModuleList, nn.Sequential)):
        owner._modules[attr] = module
    else:
        setattr(owner, attr, module)
    return old


def stem_and_tail(model: nn.Module, units: list[tuple[str, nn.Module]]):
    """The stem and tail functions around ``units`` (see the module docstring)."""
    shape: dict[str, tuple] = {}

    def stem(x: torch.Tensor) -> torch.Tensor:
        shape["image"] = tuple(x.shape[1:])

        def stop(mod, args):
            raise _Stop(args[0])

        h = units[0][1].register_forward_pre_hook(stop)
        try:
            model(x)
        except _Stop as s:
            return s.value
        finally:
            h.remove()
        raise VitqError(f"the model's forward did not reach its first unit {units[0][0]}")

    def tail(h: torch.Tensor) -> torch.Tensor:
        if "image" not in shape:
            raise VitqError("the trunk's tail ran before its stem (it needs the image size)")
        feeds = [_Feed(h if i == 0 else None) for i in range(len(units))]
        old = [_swap(model, n, f) for (n, _), f in zip(units, feeds)]
        try:
            return model(torch.zeros(h.shape[0], *shape["image"], dtype=h.dtype, device=h.device))
        finally:
            for (n, _), m in zip(units, old):
                _swap(model, n, m)

    return stem, tail


@torch.no_grad()
def check_trunk(model: nn.Module, units, stem, tail, example: torch.Tensor) -> None:
    """Refuse a cut that does not reproduce the model's output on ``example``."""
    ref = model(example)
    h = stem(example)
    for _, u in units:
        h = u(h)
    out = tail(h)
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max() or 1.0)):
        raise VitqError(f"{type(model).__name__}: stem -> units ({units[0][0]} ... {units[-1][0]}) -> tail does not "
                        "reproduce the model's output; block-wise methods cannot cut this model into units")
