"""Creating timm models by name with weights from a local file, with clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from vitq.errors import VitqError


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sniff_format(path: str) -> str | None:
    """"safetensors", "torch" (zip or legacy pickle checkpoint) or None, from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (1 << 31):
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return None


def check_weights_file(path: str, label: str, expected: str = "") -> None:
    """Refuse a weights path that does not exist, is not a file, or is neither safetensors nor a torch
    checkpoint; ``label`` names it in the message (a flag or "weights file"), ``expected`` ends the first two."""
    tail = f" (expected {expected})" if expected else ""
    if not os.path.exists(path):
        raise VitqError(f"{label} {path} does not exist{tail}")
    if not os.path.isfile(path):
        raise VitqError(f"{label} {path} is not a file{tail}")
    if sniff_format(path) is None:
        raise VitqError(f"{label} {path} is neither a safetensors file nor a torch checkpoint (expected a "
                        ".safetensors or .pth state dict)")


def read_state_dict(path: str | os.PathLike, kind: str = "weights file") -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch checkpoint (weights only, never unpickling objects)."""
    path = os.fspath(path)
    check_weights_file(path, kind)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, wrong format
        raise VitqError(f"{kind} {path} could not be read, it may be truncated ({type(e).__name__}: "
                        f"{str(e)[:100]}); expected a complete .safetensors file or torch state dict") from None
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitqError(f"{kind} {path} does not hold a state dict of tensors")
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "model", kind: str = "weights file") -> None:
    """Load a state dict, checking that key sets and shapes match before touching the model."""
    sd = read_state_dict(path, kind)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise VitqError(f"{kind} {path} does not match {what}: {'; '.join(parts)} "
                        "(expected timm key names for this model)")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise VitqError(f"{kind} {path} does not match {what}: {len(bad)} tensors of another shape "
                        f"(e.g. {k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} expected)")
    model.load_state_dict(sd, strict=True)


def close_models_hint(name: str) -> str:
    """"; similar: a, b, c" from the whole timm model list (difflib), or ""."""
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6) if name else []
    return f"; similar: {', '.join(close)}" if close else ""


def _timm_create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm.create_model; arguments timm or the model class refuse become one line naming --model-args."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as e:
        if not kwargs:
            raise
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise VitqError(f"--model-args {json.dumps(kwargs)} were refused by {name} ({msg}); expected arguments "
                        "of timm.create_model for this model, e.g. '{\"num_classes\": 10}'") from None


def create_model(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
                 **kwargs) -> nn.Module:
    """A timm model by name, in eval mode: weights from ``weights`` if given, else timm's pretrained
    download when ``pretrained`` (needs a network), else random initialisation. ``hf:DIR`` loads a Hugging
    Face ViT/DeiT classifier saved with save_pretrained (see :mod:`vitq.models.hf`)."""
    if name.startswith("hf:"):
        from vitq.models.hf import load_hf

        if weights is not None or kwargs:
            raise VitqError(f"--model {name} brings its own weights and config (expected no --weights or "
                            "--model-args)")
        return load_hf(name[3:])
    import timm

    if not timm.is_model(name):
        raise VitqError(f"unknown model {name!r} (expected a timm model name such as deit_tiny_patch16_224"
                        f"{close_models_hint(name)})")
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise VitqError(f"weights file {weights} does not exist (expected a .safetensors or .pth file)")
        model = _timm_create(name, False, kwargs)
        load_weights(model, weights, what=f"model {name}")
    else:
        if kwargs:
            _timm_create(name, False, kwargs)  # bad --model-args first, before any download attempt
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise VitqError(f"could not get pretrained weights for {name} ({type(e).__name__}); "
                            "pass --weights FILE to use a local file") from None
    from vitq.models.family import record_input_size

    record_input_size(model)
    return model.eval()
