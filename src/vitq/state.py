"""Saving and reloading a quantized model: the whole ``state_dict`` in safetensors plus a JSON config that
says how to rebuild the structure (scheme and every quantizer's kind). Never pickles a model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.prepare import prepare, quantizer_config, rebuild_quantizers
from vitq.quantizers import quantizers_of
from vitq.scheme import Scheme

STATE_FILE = "quant_state.safetensors"
CONFIG_FILE = "config.json"


def state_config(qmodel: nn.Module, **extra) -> dict:
    from vitq import __version__

    cfg = {"format": "vitq-state-1", "vitq_version": __version__, "scheme": qmodel.vitq_scheme.to_dict(),
           "quantizers": {n: quantizer_config(q) for n, q in quantizers_of(qmodel).items()}}
    cfg.update(extra)
    return cfg


def save(qmodel: nn.Module, directory: str | os.PathLike, **extra) -> None:
    """Write ``quant_state.safetensors`` and ``config.json`` into an existing directory."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()}
    save_file(tensors, os.path.join(directory, STATE_FILE), metadata={"format": "vitq-state-1"})
    write_json(os.path.join(directory, CONFIG_FILE), state_config(qmodel, **extra))


def read_config(directory: str | os.PathLike) -> dict:
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise VitqError(f"state folder {directory} does not exist (expected the --out folder of vitq quantize)")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, STATE_FILE)):
        raise VitqError(f"state folder {directory} lacks {CONFIG_FILE} or {STATE_FILE}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise VitqError(f"{path} could not be read ({e})") from None
    if cfg.get("format") != "vitq-state-1":
        raise VitqError(f"{path} is not a vitq state config (format {cfg.get('format')!r})")
    return cfg


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Prepare a fresh copy of ``model`` as the saved scheme says and load the saved state (no calibration)."""
    from vitq.models import load_weights

    cfg = read_config(directory)
    qmodel = prepare(model, Scheme.from_dict(cfg["scheme"]))
    rebuild_quantizers(qmodel, cfg["quantizers"])
    load_weights(qmodel, os.path.join(os.fspath(directory), STATE_FILE), what="the prepared model")
    return qmodel


def check_output_parent(path: str) -> None:
    """Refuse an output ``path`` that could not be written: the nearest existing folder above it must be a
    writable folder. Missing folders in between are created by :func:`make_parents` when writing."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise VitqError(f"--out {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise VitqError(f"--out {path}: cannot write into {ancestor}")


def make_parents(path: str) -> list[str]:
    """Create the missing folders above ``path``; returns those created, outermost first (for cleanup)."""
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.insert(0, parent)
        parent = os.path.dirname(parent)
    for folder in missing:
        os.mkdir(folder)
    return missing


def remove_created(folders: list[str]) -> None:
    """Undo :func:`make_parents` after a failed write (only folders still empty)."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            break


class OutputDir:
    """A temporary folder beside the final one; ``commit()`` renames it into place (replacing an existing
    folder only with --overwrite), and leaving the ``with`` block without committing removes it."""

    def __init__(self, path: str, overwrite: bool):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise VitqError(f"output folder {path} already exists (expected a new path, or pass --overwrite)")
        check_output_parent(path)
        self.tmp, self.created = None, []

    def __enter__(self) -> OutputDir:
        self.created = make_parents(self.path)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=os.path.dirname(self.path))
        return self

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        if os.path.exists(self.path):
            old = self.path + f".old{os.getpid()}"
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        self.tmp = None

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            remove_created(self.created)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
