"""Fisher weights of the reconstruction loss (``--recon-loss-weight fisher``; issue 26).

BRECQ, APHQ-ViT and FIMA-Q weight each piece's output error by a diagonal Fisher approximation: an element of a
block's output whose change moves the network's loss more counts more. Here the loss is the float model's
cross-entropy to its *own* prediction (the argmax of its logits; never a label), and one backward pass over the
calibration images through the float pieces gives, for every piece, the gradient ``g`` of that loss with
respect to the piece's output, image by image. The weight of an output element is ``g²``, divided by its mean
over the piece (all images and elements), so a weighted error has the scale of the plain one and the rounding
regulariser's weight keeps its meaning. (KL to the model's own softmax would give no gradient: it is at its
minimum there.)

The weights are kept per calibration batch, in bfloat16 (they only weight a squared error): for DeiT-Tiny on
250 images about 19 MB per piece.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from vitq.calib import CalibData
from vitq.errors import VitqError
from vitq.refine.recon_pieces import Piece

WEIGHTS = ("none", "fisher")


def fisher_weights(pieces: list[Piece], calib: CalibData) -> tuple[list[list[torch.Tensor]], dict]:
    """Per piece, per calibration batch: the normalized squared gradient of the float model's cross-entropy to
    its own argmax with respect to the piece's float output (same shape as the output). Returns (weights, info)."""
    t0 = time.perf_counter()
    grads: list[list[torch.Tensor]] = [[] for _ in pieces]
    n = 0
    for x in calib.batches():
        with torch.enable_grad():
            outs = []
            h = x
            for p in pieces:
                h = p.float(h)
                if not h.requires_grad:  # (the models' parameters are frozen: the graph starts here)
                    h = h.detach().requires_grad_(True)
                else:
                    h.retain_grad()
                outs.append(h)
            logits = h.float()
            pseudo = logits.detach().argmax(-1)
            F.cross_entropy(logits, pseudo, reduction="sum").backward()
        for i, o in enumerate(outs):
            if o.grad is None:
                raise VitqError(f"recon --recon-loss-weight fisher: no gradient reached piece {pieces[i].name} "
                                "(its output does not feed the logits)")
            grads[i].append(o.grad.detach().float().pow(2))
        n += x.shape[0]
    weights, means = [], {}
    for p, parts in zip(pieces, grads, strict=True):
        total = sum(float(t.double().sum()) for t in parts)
        count = sum(t.numel() for t in parts)
        mean = total / max(count, 1)
        if not mean > 0:
            raise VitqError(f"recon --recon-loss-weight fisher: the gradient at piece {p.name} is zero on every "
                            "calibration image (a float model that predicts every image with certainty); use "
                            "--recon-loss-weight none")
        means[p.name] = mean
        weights.append([(t / mean).to(torch.bfloat16) for t in parts])
    info = {"loss": "cross-entropy of the float model to its own argmax (no labels)", "images": n,
            "mean_squared_gradient": means, "seconds": time.perf_counter() - t0}
    return weights, info
