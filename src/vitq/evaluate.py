"""Accuracy of a quantized model next to its float original, on the same images in one pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class Metrics:
    """Running top-1/top-5 of float and quantized outputs, their top-1 agreement and KL(float ‖ quant)."""

    def __init__(self):
        self.n = 0
        self.float_top1 = self.float_top5 = self.quant_top1 = self.quant_top5 = 0
        self.agree = 0
        self.kl_sum = 0.0

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
        self.kl_sum += float((lp.exp() * (lp - lq)).sum())
        self.n += labels.shape[0]

    def result(self) -> dict:
        pct = (lambda v: 100.0 * v / self.n) if self.n else (lambda v: float("nan"))
        return {
            "num_images": self.n,
            "float": {"top1": pct(self.float_top1), "top5": pct(self.float_top5)},
            "quant": {"top1": pct(self.quant_top1), "top5": pct(self.quant_top5), "agreement": pct(self.agree),
                      "kl": self.kl_sum / self.n if self.n else float("nan")},
        }


@torch.no_grad()
def evaluate(qmodel: nn.Module, float_model: nn.Module, batches: Iterable, device="cpu", progress: bool = True,
             total: int | None = None) -> dict:
    """Top-1/top-5 of both models, top-1 agreement (percent) and mean KL(float ‖ quant) in nats.

    ``batches`` yields (images, labels). Images that could not be read are the loader's business. Runs in full
    float32 (no TF32, as the searches; the caller's settings are restored).
    """
    from vitq.precision import full_float32

    qmodel.eval()
    float_model.eval()
    m = Metrics()
    with full_float32():
        for x, y in tqdm(batches, desc="evaluate", total=total, disable=not progress, leave=False,
                         dynamic_ncols=True):
            x = x.to(device)
            m.update(float_model(x), qmodel(x), y)
    return m.result()
