"""Creating timm models by name with weights from a local file, with clear errors for bad input."""

from __future__ import annotations

import hashlib
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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch checkpoint (weights only, never unpickling objects)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VitqError(f"weights file {path} does not exist")
    if not os.path.isfile(path):
        raise VitqError(f"weights file {path} is not a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, wrong format
        raise VitqError(f"weights file {path} could not be read ({type(e).__name__}: {str(e)[:120]}); "
                        "expected a .safetensors file or a torch state dict") from None
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitqError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "model") -> None:
    """Load a state dict, checking that key sets and shapes match before touching the model."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise VitqError(f"weights file {path} does not match {what}: {'; '.join(parts)} "
                        "(expected timm key names for this model)")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise VitqError(f"weights file {path} does not match {what}: {len(bad)} tensors of another shape "
                        f"(e.g. {k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} expected)")
    model.load_state_dict(sd, strict=True)


def create_model(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
                 **kwargs) -> nn.Module:
    """A timm model by name, in eval mode: weights from ``weights`` if given, else timm's pretrained
    download when ``pretrained`` (needs a network), else random initialisation. ``hf:DIR`` loads a Hugging
    Face ViT/DeiT classifier saved with save_pretrained (see :mod:`vitq.families.hf_vit`)."""
    if name.startswith("hf:"):
        from vitq.families.hf_vit import load_hf

        if weights is not None or kwargs:
            raise VitqError(f"--model {name} brings its own weights and config (expected no --weights or "
                            "--model-args)")
        return load_hf(name[3:])
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise VitqError(f"unknown model {name!r} (expected a timm model name such as deit_tiny_patch16_224{hint})")
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise VitqError(f"weights file {weights} does not exist (expected a .safetensors or .pth file)")
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(model, weights, what=f"model {name}")
    else:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise VitqError(f"could not get pretrained weights for {name} ({type(e).__name__}); "
                            "pass --weights FILE to use a local file") from None
    from vitq.families import record_input_size

    record_input_size(model)
    return model.eval()
