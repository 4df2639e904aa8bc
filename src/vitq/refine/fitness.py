"""The fitness of a quantized model against its float teacher: the losses between their logits (Evol-Q's
infoNCE and three alternatives) and :class:`FitnessEvaluator`, which scores the model's current state over
calibration batches, running only the units from a given one to the end (its input is cached). Used by the
Evol-Q search and by the loss-landscape plot."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.models.trunk import Trunk


def infonce_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Contrastive loss of Evol-Q for one batch: row i of the quantized logits should match row i of the
    float logits, the other rows of the batch are the negatives. Scaled by 2T as in the official code."""
    q = F.normalize(zq.float(), dim=1)
    k = F.normalize(zf.float(), dim=1)
    sim = q @ k.t() / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels) * (2.0 * temperature)


def mse_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    return F.mse_loss(zq.float(), zf.float())


def kl_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """KL(float ‖ quant) of the class distributions, mean over images (nats)."""
    lp, lq = F.log_softmax(zf.float(), 1), F.log_softmax(zq.float(), 1)
    return (lp.exp() * (lp - lq)).sum(1).mean()


def cosine_loss(zq: torch.Tensor, zf: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(zq.float(), zf.float(), dim=1).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "infonce": infonce_loss, "mse": mse_loss, "kl": kl_loss, "cosine": cosine_loss,
}


class FitnessEvaluator:
    """Fitness (lower is better) of the quantized model's current state over the calibration batches.

    The float logits are computed once. ``cache_inputs(unit)`` stores the input of one unit for every
    batch; ``evaluate(unit)`` then runs only units ``unit..end``. ``evaluate(None)`` runs the whole model
    (the reference the cached path must equal). Each evaluation's time is recorded per unit.
    """

    def __init__(self, qmodel: nn.Module, float_model: nn.Module, calib: CalibData, loss: str = "infonce",
                 temperature: float = 3.0):
        if loss not in LOSSES:
            raise VitqError(f"fitness loss {loss!r} is unknown (expected one of {', '.join(LOSSES)})")
        self.qmodel, self.calib = qmodel, calib
        self.trunk = Trunk(qmodel)
        self.loss_name, self.temperature = loss, float(temperature)
        self._loss = LOSSES[loss]
        with torch.no_grad():  # float_model: the teacher (the float model, or Evol-Q's int_layernorm teacher)
            self.float_logits = [float_model(x).float() for x in calib.batches()]
        self.cached_unit: int | None = None
        self._inputs: list[torch.Tensor] = []
        self.times: dict[int | None, list[float]] = {}
        self.cache_seconds = 0.0

    @torch.no_grad()
    def cache_inputs(self, unit: int) -> None:
        t0 = time.perf_counter()
        self._inputs = [self.trunk.input_of(unit, x) for x in self.calib.batches()]
        self.cached_unit = unit
        self.cache_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def logits(self, unit: int | None = None) -> list[torch.Tensor]:
        if unit is None:
            return [self.qmodel(x).float() for x in self.calib.batches()]
        if unit != self.cached_unit:
            self.cache_inputs(unit)
        return [self.trunk.forward_from(unit, h).float() for h in self._inputs]

    @torch.no_grad()
    def evaluate(self, unit: int | None = None) -> float:
        if unit is not None and unit != self.cached_unit:
            self.cache_inputs(unit)
        t0 = time.perf_counter()
        total = 0.0
        if unit is None:
            batches = (self.qmodel(x) for x in self.calib.batches())
        else:
            batches = (self.trunk.forward_from(unit, h) for h in self._inputs)
        per_image = self.loss_name != "infonce"
        for zq, zf in zip(batches, self.float_logits, strict=True):
            total += float(self._loss(zq, zf, self.temperature)) * (zf.shape[0] if per_image else 1)
        # infoNCE: mean over batches, as the official code; the per-image losses: mean over every image
        value = total / (sum(z.shape[0] for z in self.float_logits) if per_image else len(self.float_logits))
        self.times.setdefault(unit, []).append(time.perf_counter() - t0)
        return value if math.isfinite(value) else math.inf
