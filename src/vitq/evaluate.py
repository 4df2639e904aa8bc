"""Accuracy of a quantized model next to its float original, on the same images in one pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class Metrics:
    """Running top-1/top-5 of float and quantized outputs, their top-1 agreement and KL(float ‖ quant).

    The KL is kept per batch (``kl_parts``) and summed in batch order, so partial metrics of consecutive batch
    ranges (the shards of a distributed evaluation) merge, in shard order, into exactly the numbers one process
    computes over all the batches."""

    COUNTS = ("n", "float_top1", "float_top5", "quant_top1", "quant_top5", "agree")

    def __init__(self):
        self.n = 0
        self.float_top1 = self.float_top5 = self.quant_top1 = self.quant_top5 = 0
        self.agree = 0
        self.kl_parts: list[float] = []

    @property
    def kl_sum(self) -> float:
        total = 0.0
        for v in self.kl_parts:  # left to right, as a running sum over the batches would add them
            total += v
        return total

    def merge(self, other: Metrics) -> Metrics:
        """Add the metrics of the batches that follow this one's (the next shard)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.kl_parts += other.kl_parts
        return self

    @staticmethod
    def _topk(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        return int(hit[:, 0].sum()), int(hit.any(1).sum())

    def update(self, float_logits: torch.Tensor, quant_logits: torch.Tensor, labels: torch.Tensor) -> None:
        float_logits, quant_logits, labels = float_logits.float(), quant_logits.float(), labels.to(float_logits.device)
        f1, f5 = self._topk(float_logits, labels)
        q1, q5 = self._topk(quant_logits, labels)
        self.float_top1 += f1
        self.float_top5 += f5
        self.quant_top1 += q1
        self.quant_top5 += q5
        self.agree += int((float_logits.argmax(1) == quant_logits.argmax(1)).sum())
        lp, lq = F.log_softmax(float_logits, 1), F.log_softmax(quant_logits, 1)
        self.kl_parts.append(float((lp.exp() * (lp - lq)).sum()))
        self.n += labels.shape[0]

    def result(self) -> dict:
        pct = (lambda v: 100.0 * v / self.n) if self.n else (lambda v: float("nan"))
        return {
            "num_images": self.n,
            "float": {"top1": pct(self.float_top1), "top5": pct(self.float_top5)},
            "quant": {"top1": pct(self.quant_top1), "top5": pct(self.quant_top5), "agreement": pct(self.agree),
                      "kl": self.kl_sum / self.n if self.n else float("nan")},
        }


def batch_ranges(num_batches: int, shards: int) -> list[range]:
    """``num_batches`` consecutive batches in ``shards`` (at most) contiguous, near-equal, non-empty ranges."""
    shards = max(1, min(shards, num_batches))
    edges = [round(i * num_batches / shards) for i in range(shards + 1)]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@torch.no_grad()
def evaluate(qmodel: nn.Module, float_model: nn.Module, batches: Iterable, device="cpu", progress: bool = True,
             total: int | None = None) -> dict:
    """Top-1/top-5 of both models, top-1 agreement (percent) and mean KL(float ‖ quant) in nats.

    ``batches`` yields (images, labels). Images that could not be read are the loader's business. Runs in full
    float32 (no TF32, as the searches; the caller's settings are restored).
    """
    return evaluate_metrics(qmodel, float_model, batches, device, progress, total).result()


@torch.no_grad()
def evaluate_metrics(qmodel: nn.Module, float_model: nn.Module | None, batches: Iterable, device="cpu",
                     progress: bool = False, total: int | None = None, float_logits=None) -> Metrics:
    """:func:`evaluate`'s running :class:`Metrics` (to merge with other shards). ``float_logits``: the float
    model's logits of each batch, in order (a cache), instead of running ``float_model``."""
    from vitq.precision import full_float32

    qmodel.eval()
    if float_model is not None:
        float_model.eval()
    m = Metrics()
    cached = iter(float_logits) if float_logits is not None else None
    with full_float32():
        for x, y in tqdm(batches, desc="evaluate", total=total, disable=not progress, leave=False,
                         dynamic_ncols=True):
            x = x.to(device)
            zf = next(cached).to(device) if cached is not None else float_model(x)
            m.update(zf, qmodel(x), y)
    return m
