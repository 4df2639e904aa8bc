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
from vitq.quant.base import quantizers_of
from vitq.scheme import Scheme

STATE_FILE = "quant_state.safetensors"
CONFIG_FILE = "config.json"


def state_config(qmodel: nn.Module, **extra) -> dict:
    from vitq._version import __version__

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
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise VitqError(f"state folder {directory} is a file, not a folder (expected the --out folder of vitq "
                        "quantize)")
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
    from vitq.models.loading import load_weights

    cfg = read_config(directory)
    qmodel = prepare(model, Scheme.from_dict(cfg["scheme"]))
    rebuild_quantizers(qmodel, cfg["quantizers"])
    load_weights(qmodel, os.path.join(os.fspath(directory), STATE_FILE), what="the prepared model",
                 kind="state file")
    return qmodel


MARKER_FILE = ".vitq-output.json"
# names vitq wrote before folders carried a marker: a folder holding only these may be replaced too
LEGACY_OUTPUT_FILES = frozenset({"results.json", CONFIG_FILE, STATE_FILE, "landscape.png", "landscape.json",
                                 "table.md", "demo_results.json"})


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str) -> None:
    """Give ``root`` and everything below it the permissions a plain mkdir/open would have had (temporary
    folders and files are created private)."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def check_output_parent(path: str, flag: str = "--out") -> None:
    """Refuse an output ``path`` that could not be written: the nearest existing folder above it must be a
    writable folder. Missing folders in between are created by :func:`make_parents` when writing."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise VitqError(f"{flag} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise VitqError(f"{flag} {path}: cannot write into {ancestor}")


def check_not_precious(path: str, flag: str = "--out") -> None:
    """Refuse an output that is the current folder, one above it, the home folder or the root."""
    target = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if target in (os.path.sep, home) or cwd == target or cwd.startswith(target.rstrip(os.path.sep) + os.path.sep):
        raise VitqError(f"{flag} {path} is the current folder, a folder above it, the home folder or the root "
                        "(expected a new folder for the results, e.g. runs/NAME)")


def read_marker(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MARKER_FILE)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "vitq" else None


def _legacy_vitq_output(path: str) -> bool:
    """A folder vitq wrote before folders carried a marker: a state config, demo or landscape record of vitq."""
    def load(name: str):
        try:
            with open(os.path.join(path, name)) as f:
                return json.load(f)
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    cfg, demo, land = load(CONFIG_FILE), load("demo_results.json"), load("landscape.json")
    return ((isinstance(cfg, dict) and cfg.get("format") == "vitq-state-1")
            or (isinstance(demo, dict) and "float_top1" in demo and "results" in demo)
            or (isinstance(land, dict) and "perturbation" in land and "infonce" in land))


def foreign_entries(path: str) -> list[str]:
    """What in folder ``path`` vitq did not write (by its marker, or for older folders by the file names vitq
    uses); empty when the whole folder is vitq's own output."""
    marker = read_marker(path)
    if marker:
        ours = set(marker.get("files", [])) | {MARKER_FILE}
    else:
        ours = set(LEGACY_OUTPUT_FILES) if _legacy_vitq_output(path) else set()
    found = []
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(folder, name), path)
            if name in files and rel in ours:
                continue
            if name in dirs and any(o.startswith(rel + os.sep) for o in ours):
                continue
            found.append(rel)
    return sorted(found)


def check_replaceable(path: str, flag: str = "--out", command: str | None = None) -> None:
    """Raise unless ``path`` is a folder that vitq wrote (and nobody has added to since)."""
    if not os.path.isdir(path) or os.path.islink(path):
        raise VitqError(f"{flag} {path} exists and is not a folder vitq wrote (expected a new path; --overwrite "
                        "replaces only vitq's own output folders)")
    foreign = foreign_entries(path)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise VitqError(f"{flag} {path} holds {foreign[0]!r}{more}, which vitq did not write; --overwrite "
                        "replaces only vitq's own output folders (expected a new path, or move those files)")
    marker = read_marker(path)
    if command is not None and (marker or {}).get("command") not in (None, command):
        raise VitqError(f"{flag} {path} holds the output of vitq {marker['command']}, not of vitq {command} "
                        "(expected a new path, or pass --overwrite)")


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
    """A temporary folder beside the final one; ``commit()`` writes the marker (what vitq wrote), and renames
    it into place. An existing folder is replaced only with ``overwrite`` and only if vitq wrote all of it
    (checked here, before any work, and again just before the replacement); the old folder is removed only
    after the new one is in place. Leaving the ``with`` block without committing removes the temporary folder.

    ``command`` names what writes the folder (recorded in the marker). ``replace_own`` lets a command replace
    its own earlier output without ``overwrite`` (the demo's default folder)."""

    def __init__(self, path: str, overwrite: bool, flag: str = "--out", command: str = "quantize",
                 replace_own: bool = False):
        self.path = os.path.abspath(path)
        self.flag, self.command, self.given = flag, command, path
        check_not_precious(path, flag)
        if os.path.lexists(self.path):
            if not overwrite:
                marker = read_marker(self.path) if os.path.isdir(self.path) else None
                if not (replace_own and marker and marker.get("command") == command):
                    raise VitqError(f"{flag} {path} already exists (expected a new path, or pass --overwrite to "
                                    "replace a folder vitq wrote)")
            check_replaceable(self.path, flag)
        check_output_parent(path, flag)
        self.tmp, self.created = None, []

    def __enter__(self) -> OutputDir:
        self.created = make_parents(self.path)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                                    dir=os.path.dirname(self.path))
        return self

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self) -> None:
        from vitq._version import __version__

        files = sorted(os.path.relpath(os.path.join(d, f), self.tmp) for d, _, fs in os.walk(self.tmp) for f in fs)
        write_json(self.file(MARKER_FILE), {"written_by": "vitq", "vitq_version": __version__,
                                            "command": self.command, "files": files})
        apply_umask(self.tmp)
        if os.path.lexists(self.path):
            check_replaceable(self.path, self.flag)  # again: something may have been added during the run
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".old",
                                   dir=os.path.dirname(self.path))
            os.rmdir(old)
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


def is_vitq_results_file(path: str) -> bool:
    """True for a JSON file that vitq evaluate/quantize wrote (it records vitq's version and command)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("versions"), dict) and "vitq" in obj["versions"]


def check_output_file(path: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a results-file path that exists (unless --overwrite and vitq wrote it), is a folder, or cannot
    be written."""
    check_not_precious(path, flag)
    if os.path.isdir(path):
        raise VitqError(f"{flag} {path} is a folder (expected the path of a JSON file to write)")
    if os.path.lexists(path):
        if not overwrite:
            raise VitqError(f"{flag} {path} already exists (expected a new path, or pass --overwrite)")
        if not is_vitq_results_file(path):
            raise VitqError(f"{flag} {path} exists and is not a results file vitq wrote (expected a new path; "
                            "--overwrite replaces only vitq's own results)")
    check_output_parent(path, flag)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict, fmt: str) -> None:
    """A refiner's resumable checkpoint: tensors plus JSON ``meta`` in one safetensors file, written to a temporary
    file and renamed, so a kill never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp,
              metadata={"format": fmt, "meta": json.dumps(meta)})
    os.replace(tmp, path)


def read_checkpoint(path: str, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint written by :func:`write_checkpoint` in format ``fmt``; ``what`` names the
    refiner in errors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise VitqError(f"{what} checkpoint {path} could not be read ({type(e).__name__}); delete it to start "
                        "again") from None
    if md.get("format") != fmt:
        raise VitqError(f"{path} is not a {what} checkpoint (format {md.get('format')!r})")
    return tensors, json.loads(md["meta"])
