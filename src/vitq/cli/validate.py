"""Checks of command-line input that run before any model is loaded, image decoded or calibration started, so a
typo never costs a long computation. Every error is a one-line ``VitqError`` naming the flag as the user typed
it and what was expected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from vitq.errors import VitqError

log = logging.getLogger("vitq")

MAX_DEFAULT_THREADS = 4


# ------------------------------------------------------------------------------------------------ numbers
def positive(flag: str, value, none_ok: bool = True) -> None:
    """An integer >= 1 (or None where the flag is optional)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VitqError(f"{flag} {value} is invalid (expected a positive integer)")


def non_negative(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VitqError(f"{flag} {value} is invalid (expected an integer >= 0)")


def in_range(flag: str, value: float, low: float, high: float, what: str) -> None:
    """``low < value <= high`` and finite."""
    if not (isinstance(value, (int, float)) and low < value <= high):
        raise VitqError(f"{flag} {value} is out of range (expected {what})")


def bits(flag: str, value: int | None, allowed: range) -> None:
    from vitq.scheme import check_bits

    if value is not None:
        check_bits(flag, value, allowed, label=f"{flag} {value}")


def quantizer_kind(flag: str, kind: str | None) -> None:
    from vitq.quant.base import QUANTIZER_KINDS
    if kind is not None and (kind not in QUANTIZER_KINDS or kind == "base"):
        kinds = ", ".join(k for k in sorted(QUANTIZER_KINDS) if k != "base")
        raise VitqError(f"{flag} {kind!r} is not a quantizer kind (expected one of {kinds})")


# ------------------------------------------------------------------------------------------------ threads
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """All cores this process may use, at most 4 (more rarely helps a small ViT on a CPU and hurts when the
    machine is shared)."""
    return max(1, min(available_cores(), MAX_DEFAULT_THREADS))


def set_threads(n: int | None, flag: str = "--threads") -> int:
    """Use ``n`` torch threads for intra-op and (where still possible) inter-op work; returns ``n``."""
    n = default_threads() if n is None else n
    positive(flag, n, none_ok=False)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass  # only settable once per process, before any inter-op work (e.g. the second main() in a test)
    return n


def add_threads_flag(p: argparse.ArgumentParser, default: int | None = None, why: str = "") -> None:
    text = (f"torch CPU threads (default {default}{why})" if default is not None else
            f"torch CPU threads (default: available cores, at most {MAX_DEFAULT_THREADS}; here {default_threads()})")
    p.add_argument("--threads", type=int, default=default, metavar="N", help=text)


# ------------------------------------------------------------------------------------------------ text input
def model_args(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise VitqError(f"--model-args {text!r} is not a JSON object (expected e.g. '{{\"num_classes\": 10}}')")
    return value


def overrides(texts: list[str]) -> tuple:
    from vitq.scheme import A_BITS, W_BITS, Override

    out = []
    for text in texts:
        try:
            o = Override.parse(text)
        except VitqError:
            raise VitqError(f"--override {text!r} is invalid (expected PATTERN:wBaB, e.g. 'head:w8a8')") from None
        bits(f"--override {text!r}: weight bits", o.w_bits, W_BITS)
        bits(f"--override {text!r}: activation bits", o.a_bits, A_BITS)
        out.append(o)
    return tuple(out)


def overrides_match(model: torch.nn.Module, given: tuple, texts: list[str]) -> None:
    """Every --override pattern must name at least one module of the model (else it would be ignored)."""
    import fnmatch

    names = [n for n, _ in model.named_modules() if n]
    for o, text in zip(given, texts, strict=True):
        if not any(fnmatch.fnmatchcase(n, o.pattern) for n in names):
            examples = ", ".join(n for n in names if n.count(".") <= 2 and ("qkv" in n or n == "head"))[:90]
            raise VitqError(f"--override {text!r}: pattern {o.pattern!r} matches no module of this model "
                            f"(expected a glob over module names, e.g. {examples or names[0]} ...)")


# ------------------------------------------------------------------------------------------------ paths
def weights_file(path: str | None, flag: str = "--weights") -> None:
    from vitq.models.loading import check_weights_file

    if path is not None:
        check_weights_file(path, flag, expected="a .safetensors or .pth file")


def state_folder(path: str, flag: str = "--state") -> dict:
    from vitq.state import read_config

    if os.path.isfile(path):
        raise VitqError(f"{flag} {path} is a file, not a folder (expected the --out folder of vitq quantize)")
    if not os.path.exists(path):
        raise VitqError(f"{flag} {path} does not exist (expected the --out folder of vitq quantize)")
    return read_config(path)


def image_records(flag: str, folder: str, num: int | None, num_flag: str, seed: int, labels: str = "folder",
                  class_map: dict | None = None, what: str = "images") -> list:
    """Scan ``folder`` and draw ``num`` images (seeded); warns when fewer images exist than asked for."""
    from vitq.data import scan_image_folder, select_records

    positive(num_flag, num)
    records = scan_image_folder(folder, labels=labels, flag=flag, class_map=class_map)
    if num is not None and num > len(records):
        log.warning("%s %d, but %s %s holds only %d images: using all %d", num_flag, num, flag, folder,
                    len(records), len(records))
    return select_records(records, num, seed, flag=num_flag)


def output_file_for_plot(path: str | None, flag: str = "--plot") -> None:
    if path is None:
        return
    from vitq.state import check_output_parent

    if os.path.isdir(path):
        raise VitqError(f"{flag} {path} is a folder (expected the path of a PNG file to write)")
    if not path.lower().endswith(".png"):
        raise VitqError(f"{flag} {path} does not end in .png (expected the path of a PNG file to write)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise VitqError(f"{flag} {path}: folder {parent} does not exist (expected an existing folder)")
    check_output_parent(path, flag)


def checkpoint_file(path: str, flag: str) -> None:
    if os.path.isdir(path):
        raise VitqError(f"{flag} {path} is a folder (expected a file path for the resumable checkpoint)")
    from vitq.state import check_output_parent

    check_output_parent(path, flag)


# ------------------------------------------------------------------------------------------------ options
def entry_options(args: argparse.Namespace, owners: dict[str, tuple[str, str, str]], method: str | None,
                  refiners: list[str]) -> None:
    """Refuse a flag of a method or refiner that is not one chosen (it would be silently ignored).
    ``owners`` maps an argparse dest to (kind, entry name, flag); ``refiners`` is the --refine chain."""
    for dest, (kind, name, flag) in owners.items():
        if getattr(args, dest, None) is None:
            continue
        chosen = [method] if kind == "method" else list(refiners)
        if name in chosen:
            continue
        opt = "--method" if kind == "method" else "--refine"
        if not [c for c in chosen if c]:
            raise VitqError(f"{flag} is an option of {kind} {name}, but no {opt} was given (drop it, or pass "
                            f"{opt} {name})")
        raise VitqError(f"{flag} is an option of {kind} {name}, not of {opt} {','.join(c for c in chosen if c)} "
                        f"(drop it, or use {opt} {name})")
