"""Generated sets as PNG folders a user can open, reuse and delete.

A set lives in ``<dir>/<model>-<generator>-<key>/``: ``NNNNN_cCLASS.png`` (8-bit RGB at the model's input size,
the pixels the model is fed, so no resize or crop when read back) and ``manifest.json`` (what made it). The key
hashes everything that decides the images: the model's weights, the generator and its options (less the loop
options at the values that run the loop as it ran before they existed), the seed, the count, the input size and
normalisation, and the real images a generator learned from. A folder whose key matches is read instead of
generating again; delete it to make a fresh set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import torch
from PIL import Image
from torch import nn

from vitq.errors import VitqError

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the images a given key makes would change


def tensor_digest(h, t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        tensor_digest(h, t)
    return h.hexdigest()


# loop options added after sets were first keyed, at the values that run the loop as it ran before them: left
# out of a key, so that a set made before they existed keeps its key (bn, fdda); any other value is keyed
LOOP_NEUTRAL = {"rounds": 1, "warmup": 0.0, "jitter": 0, "flip": False, "beta1": 0.9, "beta2": 0.999}


def key_options(options: dict) -> dict:
    """The generator options a set's key hashes: all of them but the loop options at their neutral values."""
    return {k: v for k, v in options.items() if not (k in LOOP_NEUTRAL and v == LOOP_NEUTRAL[k])}


def set_key(fields: dict, real: torch.Tensor | None) -> str:
    h = hashlib.sha256(json.dumps({**fields, "format": FORMAT}, sort_keys=True).encode())
    if real is not None:
        tensor_digest(h, real)
    return h.hexdigest()[:16]


def set_folder(root: str, model_label: str, generator: str, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_label).strip("_")[:60] or "model"
    return os.path.join(root, f"{slug}-{generator}-{key}")


def to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised [N, C, H, W] -> 8-bit [N, H, W, C] pixels."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pix = (x.float() * s + m).clamp(0, 1) * 255.0
    return pix.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(arr: np.ndarray, mean, std) -> torch.Tensor:
    """8-bit [N, H, W, C] -> normalised [N, C, H, W] (the exact inverse of :func:`to_uint8` up to rounding), in
    the contiguous layout a loaded image has: a model runs a channels-last view with other kernels, and its
    outputs differ in the last bits from the same images read from a folder or passed through an array."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - m) / s).contiguous()


def write_set(folder: str, pixels: np.ndarray, labels: torch.Tensor, manifest: dict) -> None:
    """Write the PNGs and the manifest into a temporary folder, then move it into place."""
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise VitqError(f"--synthetic-dir {parent}: cannot create it ({e.strerror})") from None
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []
    for k, (img, c) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        name = f"{k:05d}_c{c}.png"
        mode = "L" if img.shape[2] == 1 else "RGB"
        Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(os.path.join(tmp, name))
        files.append(name)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({**manifest, "files": files, "labels": labels.tolist()}, f, indent=1)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def read_set(folder: str, key: str, mean, std) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """The set in ``folder`` when it exists whole and its key matches (else None)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("key") != key:
            return None
        arrs = []
        for name in manifest["files"]:
            with Image.open(os.path.join(folder, name)) as im:
                a = np.asarray(im)
            arrs.append(a[..., None] if a.ndim == 2 else a)
    except (OSError, ValueError, KeyError):
        return None  # a damaged set is made again
    labels = torch.tensor(manifest["labels"], dtype=torch.long)
    return from_uint8(np.stack(arrs), mean, std), labels, manifest
