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


def scan_image_folder(root: str | os.PathLike, labels: str = "wnid", flag: str | None = None,
                      class_map: dict[str, int] | None = None) -> list[ImageRecord]:
    """Collect images from root/<class>/<file>; wnid labels go by name so partial splits stay right.

    ``labels="folder"`` labels classes by sorted folder position, or by ``class_map`` ({folder: class index})
    when given (every folder must be in it). ``flag`` (e.g. ``--val``) starts every error message."""
    if labels not in LABEL_MODES:
        raise VitqError(f"labels={labels!r}: expected one of {', '.join(LABEL_MODES)}")
    given = os.fspath(root)
    root = os.path.abspath(given)
    where = f"{flag} {given}" if flag else root
    if not os.path.exists(root):
        raise VitqError(f"{where}: image folder does not exist")
    if not os.path.isdir(root):
        raise VitqError(f"{where}: expected a directory with one sub-folder per class, got a file")
    classes = sorted(e.name for e in _scandir(root) if e.is_dir())
    if labels == "wnid":
        table = imagenet_wnid_to_index()
        for name in classes:
            if name not in table:
                raise VitqError(
                    f"{where}: folder name {name!r} is not an ImageNet-1k WordNet id (like n01440764); for "
                    "other class folders pass --labels folder (agreement and KL only, no top-1) plus "
                    "--class-map FILE for top-1"
                )
        class_label = {name: table[name] for name in classes}
    elif class_map is not None:
        missing = [name for name in classes if name not in class_map]
        if missing:
            raise VitqError(f"{where}: class folder {missing[0]!r} is not in --class-map ({len(missing)} folders "
                            "missing; expected an entry {folder: class index} for every class folder)")
        class_label = {name: int(class_map[name]) for name in classes}
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
            f"{where}: contains no images (expected one sub-folder per class with .jpg/.png files)"
        )
    return records


def read_class_map(path: str, flag: str = "--class-map") -> dict[str, int]:
    """A JSON object {class folder name: class index of the model's head}."""
    import json

    if not os.path.isfile(path):
        raise VitqError(f"{flag} {path} is not a file (expected a JSON object {{folder name: class index}})")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VitqError(f"{flag} {path} is not valid JSON ({type(e).__name__}); expected a JSON object "
                        "{folder name: class index}") from None
    if not isinstance(obj, dict) or not obj:
        raise VitqError(f"{flag} {path} is not a non-empty JSON object (expected {{folder name: class index}})")
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise VitqError(f"{flag} {path}: {k!r} maps to {v!r} (expected a class index, an integer >= 0)")
    return obj


def select_records(records: list[ImageRecord], num: int | None, seed: int, flag: str = "num") -> list[ImageRecord]:
    """Seeded subset without replacement; sampling from path order makes it independent of input order."""
    if num is not None and num <= 0:
        raise VitqError(f"{flag} {num} is invalid (expected a positive number of images)")
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


# what was done to an odd image on the way to RGB, as the warning says it
NOTE_TEXT = {
    "16bit": "have 16 or 32 bits per pixel (scaled to 8 bits)",
    "float": "have floating-point pixels (scaled to 8 bits)",
    "alpha": "have an alpha channel (transparency dropped, not composited)",
    "tiny": "are smaller than the model input (upscaled)",
}


def to_rgb(im: Image.Image, min_size: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[str, ...]]:
    """Decode to 8-bit RGB, scaling 16/32-bit and float pixels down properly (PIL's convert("RGB") clips
    them at 255, which turns a 16-bit image nearly white); returns the image and what was odd about it
    (keys of NOTE_TEXT). ``min_size`` is the model input (height, width)."""
    import numpy as np

    notes = []
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if im.mode == "F":
            full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top  # 0..1, 0..255 or its own range
            notes.append("float")
        else:
            full = 65535.0 if top <= 65535.0 else top
            notes.append("16bit")
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8))
    elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        notes.append("alpha")
    if min_size is not None and (im.size[1] < min_size[0] or im.size[0] < min_size[1]):
        notes.append("tiny")
    return im.convert("RGB"), tuple(notes)


class ImageDataset(Dataset):
    """Yields (tensor, label, ok, notes); unreadable files give ok=False and None instead of killing a run;
    ``notes`` says what was odd about a readable one (keys of NOTE_TEXT)."""

    def __init__(self, records: list[ImageRecord], transform: Callable, min_size: tuple[int, int] | None = None):
        self.records = list(records)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            with Image.open(rec.path) as im:
                im.load()  # a full decode, so truncation surfaces here
                img, notes = to_rgb(im, self.min_size)
        except Exception:  # PIL raises many types (OSError, SyntaxError, EOFError, ...) for bad files
            return None, rec.label, False, ()
        return self.transform(img), rec.label, True, notes


def _collate(batch):
    """Stack the readable items; keep an ok-mask and the notes so the loader can name skipped/odd files."""
    ok = torch.tensor([b[2] for b in batch], dtype=torch.bool)
    notes = [b[3] for b in batch]
    good = [b for b in batch if b[2]]
    images = torch.stack([b[0] for b in good]) if good else None
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, ok, notes


class ImageLoader:
    """Iterable of (images, labels) batches minus unreadable images, whose paths go to .skipped; odd images
    (see NOTE_TEXT) are listed per kind in .notes."""

    def __init__(self, records: list[ImageRecord], transform: Callable, batch_size: int, num_workers: int,
                 min_size: tuple[int, int] | None = None):
        if batch_size <= 0:
            raise VitqError(f"--batch-size {batch_size} is invalid (expected a positive integer)")
        if num_workers < 0:
            raise VitqError(f"--num-workers {num_workers} is invalid (expected 0 or more)")
        self.records = list(records)
        self.batch_size = batch_size
        self.skipped: list[str] = []
        self.notes: dict[str, list[str]] = {}
        self._loader = DataLoader(
            ImageDataset(self.records, transform, min_size), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, collate_fn=_collate,
        )

    @property
    def num_images(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # shuffle=False keeps batches in index order, so batch k covers records[k*bs : (k+1)*bs].
        for k, (images, labels, ok, notes) in enumerate(self._loader):
            start = k * self.batch_size
            for j, kinds in enumerate(notes):
                for kind in kinds:
                    paths = self.notes.setdefault(kind, [])
                    if self.records[start + j].path not in paths:
                        paths.append(self.records[start + j].path)
            for j in (~ok).nonzero().flatten().tolist():
                path = self.records[start + j].path
                if path not in self.skipped:
                    self.skipped.append(path)
            if images is not None:
                yield images, labels


def make_loader(records, transform, batch_size: int = 50, num_workers: int = 0,
                min_size: tuple[int, int] | None = None) -> ImageLoader:
    """Build the fault-tolerant, order-preserving loader used for calibration and evaluation."""
    return ImageLoader(records, transform, batch_size, num_workers, min_size)


def read_images(records, transform, batch_size: int = 50, num_workers: int = 0,
                min_size: tuple[int, int] | None = None, progress: bool = False,
                what: str = "images") -> tuple[torch.Tensor | None, torch.Tensor | None, ImageLoader]:
    """Decode and preprocess ``records`` into one tensor: (images, labels, the loader, which knows what was
    skipped and why); (None, None, loader) when no image could be read."""
    from tqdm.auto import tqdm

    loader = make_loader(records, transform, batch_size=batch_size, num_workers=num_workers, min_size=min_size)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"load {what}", disable=not progress, leave=False, dynamic_ncols=True):
        xs.append(x)
        ys.append(y)
    if not xs:
        return None, None, loader
    return torch.cat(xs), torch.cat(ys), loader


def report_images(loader: ImageLoader, what: str, log) -> None:
    """One warning per kind: unreadable images skipped, and each kind of odd image (count and an example)."""
    if loader.skipped:
        log.warning("skipped %d unreadable %s image(s) of %d (e.g. %s)", len(loader.skipped), what,
                    loader.num_images, loader.skipped[0])
    for kind, paths in loader.notes.items():
        log.warning("%d %s image(s) %s (e.g. %s)", len(paths), what, NOTE_TEXT.get(kind, kind), paths[0])
