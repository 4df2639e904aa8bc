"""Image-folder data for calibration and evaluation: labelled scans, seeded subsets, a tolerant loader."""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vitq.errors import VitqError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LABEL_MODES = ("wnid", "folder")


@dataclass(frozen=True)
class ImageRecord:
    """One image file and its class index (ImageNet index for wnid labels, folder position otherwise)."""

    path: str
    label: int


@functools.lru_cache(maxsize=1)
def imagenet_wnid_to_index() -> dict[str, int]:
    """Map WordNet id -> ImageNet-1k class index; from timm's bundled metadata, so it works offline."""
    from timm.data import ImageNetInfo

    return {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}


def _scandir(path: str) -> list[os.DirEntry]:
    """List a directory, turning permission problems into a one-line VitqError."""
    try:
        with os.scandir(path) as it:
            return [e for e in it if not e.name.startswith(".")]
    except PermissionError as e:
        raise VitqError(f"{path}: cannot read directory (permission denied)") from e


def scan_image_folder(root: str | os.PathLike, labels: str = "wnid") -> list[ImageRecord]:
    """Collect images from root/<class>/<file>; wnid labels go by name so partial splits stay right."""
    if labels not in LABEL_MODES:
        raise VitqError(f"labels={labels!r}: expected one of {', '.join(LABEL_MODES)}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise VitqError(f"{root}: image folder does not exist")
    if not os.path.isdir(root):
        raise VitqError(f"{root}: expected a directory with one sub-folder per class, got a file")
    classes = sorted(e.name for e in _scandir(root) if e.is_dir())
    if labels == "wnid":
        table = imagenet_wnid_to_index()
        for name in classes:
            if name not in table:
                raise VitqError(
                    f"{os.path.join(root, name)}: folder name {name!r} is not an ImageNet-1k WordNet id "
                    "(like n01440764); use --labels folder to label classes by sorted folder position"
                )
        class_label = {name: table[name] for name in classes}
    else:
        class_label = {name: i for i, name in enumerate(classes)}
    records = []
    for name in classes:
        folder = os.path.join(root, name)
        files = sorted(
            e.name for e in _scandir(folder)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
        records += [ImageRecord(os.path.join(folder, f), class_label[name]) for f in files]
    if not records:
        raise VitqError(
            f"{root}: contains no images (expected one sub-folder per class with .jpg/.png files)"
        )
    return records


def select_records(records: list[ImageRecord], num: int | None, seed: int) -> list[ImageRecord]:
    """Seeded subset without replacement; sampling from path order makes it independent of input order."""
    if num is not None and num <= 0:
        raise VitqError(f"num={num}: expected a positive number of images (or None for all)")
    ordered = sorted(records, key=lambda r: r.path)
    if num is None or num >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, num), key=lambda r: r.path)


def model_transform(model) -> tuple[Callable, dict]:
    """The model's eval preprocessing, plus a JSON-able description so results record what was fed in."""
    from timm.data import create_transform, resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    # timm keeps the pretrained cfg's size for a model built with another img_size; use the built size.
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, (tuple, list)) and len(built) == 2 and tuple(cfg["input_size"][1:]) != tuple(built):
        cfg["input_size"] = (cfg["input_size"][0], int(built[0]), int(built[1]))
    transform = create_transform(**cfg, is_training=False)
    desc = {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg["crop_mode"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "repr": str(transform),
    }
    return transform, desc


class ImageDataset(Dataset):
    """Yields (tensor, label, ok); unreadable files give ok=False and None instead of killing a run."""

    def __init__(self, records: list[ImageRecord], transform: Callable):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            with Image.open(rec.path) as im:
                img = im.convert("RGB")  # convert() forces a full decode, so truncation surfaces here
        except Exception:  # PIL raises many types (OSError, SyntaxError, EOFError, ...) for bad files
            return None, rec.label, False
        return self.transform(img), rec.label, True


def _collate(batch):
    """Stack the readable items; keep an ok-mask so the loader can name the skipped files."""
    ok = torch.tensor([b[2] for b in batch], dtype=torch.bool)
    good = [b for b in batch if b[2]]
    images = torch.stack([b[0] for b in good]) if good else None
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, ok


class ImageLoader:
    """Iterable of (images, labels) batches minus unreadable images, whose paths go to .skipped."""

    def __init__(self, records: list[ImageRecord], transform: Callable, batch_size: int, num_workers: int):
        if batch_size <= 0:
            raise VitqError(f"batch_size={batch_size}: expected a positive integer")
        if num_workers < 0:
            raise VitqError(f"num_workers={num_workers}: expected 0 or more")
        self.records = list(records)
        self.batch_size = batch_size
        self.skipped: list[str] = []
        self._loader = DataLoader(
            ImageDataset(self.records, transform), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, collate_fn=_collate,
        )

    @property
    def num_images(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # shuffle=False keeps batches in index order, so batch k covers records[k*bs : (k+1)*bs].
        for k, (images, labels, ok) in enumerate(self._loader):
            start = k * self.batch_size
            for j in (~ok).nonzero().flatten().tolist():
                path = self.records[start + j].path
                if path not in self.skipped:
                    self.skipped.append(path)
            if images is not None:
                yield images, labels


def make_loader(records, transform, batch_size: int = 50, num_workers: int = 0) -> ImageLoader:
    """Build the fault-tolerant, order-preserving loader used for calibration and evaluation."""
    return ImageLoader(records, transform, batch_size, num_workers)
