"""The one table of tiny models the tests use: every model family vitq supports, random-init (timm builds them
from its own code, no weights downloaded; the Hugging Face ones need ``transformers`` and are skipped without
it), small enough that a quantize run takes well under a second.

``tiny_model(key)`` builds one (seeded), ``tiny_images(key, n)`` makes generated images of its input size.
A family registered in :data:`vitq.models.FAMILIES` without a model here fails tests/test_contract.py, so add
one when a family is added.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
import timm
import torch
from torch import nn


@dataclass(frozen=True)
class Tiny:
    family: str  # the name vitq.models.family_of gives it
    name: str  # timm model name, or the Hugging Face class prefix ("ViT", "DeiT") for family hf-vit
    kwargs: dict = field(default_factory=dict)  # timm.create_model keywords (the CLI's --model-args)
    size: int = 32  # input height = width


# key -> tiny model. ViT/DeiT/Swin: the timm transformer family; the CNNs cover residual blocks (ResNet,
# RegNet), depthwise convolutions and TF 'SAME' padding (EfficientNet-Lite), squeeze-excite and Hardswish
# (MobileNetV3); LeViT its convolutional stem, attention biases and downsampling attention.
ZOO: dict[str, Tiny] = {
    "deit": Tiny("timm-vit", "deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10)),
    "vit": Tiny("timm-vit", "vit_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64,
                                                          num_heads=2, class_token=False, global_pool="avg",
                                                          fc_norm=True, num_classes=10)),
    "swin": Tiny("timm-vit", "swin_tiny_patch4_window7_224", dict(img_size=56, depths=(2, 2), num_heads=(2, 4),
                                                                  embed_dim=32, window_size=7, num_classes=10),
                 size=56),
    "resnet": Tiny("timm-cnn", "resnet18", dict(channels=(8, 16, 32, 64), stem_width=8, num_classes=10)),
    "regnet": Tiny("timm-cnn", "regnetx_002", dict(num_classes=10)),
    "effnet": Tiny("timm-cnn", "tf_efficientnet_lite0", dict(num_classes=10)),
    "mbv3": Tiny("timm-cnn", "mobilenetv3_small_050", dict(num_classes=10)),
    "levit": Tiny("timm-levit", "levit_128s", dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                                                   num_heads=(2, 3, 4), depth=(1, 1, 1), num_classes=10), size=64),
    "hf_vit": Tiny("hf-vit", "ViT"),
    "hf_deit": Tiny("hf-vit", "DeiT"),
    # --- Hugging Face classes beyond ViT/DeiT (issue 22, export helper): kwargs are the model config's
    # (LayerScale at 0.1 and a class token of std 0.2, as a trained DINOv2 has, not init's 1e-5 / 1e-10)
    "hf_dinov2": Tiny("hf-vit", "Dinov2", dict(layerscale_value=0.1, mlp_ratio=2)),
    "hf_beit": Tiny("hf-vit", "Beit", dict(use_relative_position_bias=True, layer_scale_init_value=0.1,
                                            use_mean_pooling=True)),
    "hf_convnext": Tiny("hf-convnext", "ConvNext", dict(num_channels=3, patch_size=4, hidden_sizes=[16, 32],
                                                         depths=[1, 1], num_stages=2, layer_scale_init_value=0.1)),
}
HF_KEYS = tuple(k for k, z in ZOO.items() if z.family.startswith("hf-"))

# the timm ViT/DeiT/Swin models by key: (timm name, kwargs); the table most tests parametrize over
TINY = {k: (z.name, z.kwargs) for k, z in ZOO.items() if z.family == "timm-vit"}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics/affine and LeViT attention biases, so folding and biases are exercised
    (timm initialises BN as the identity and the biases as zero). Models without either are left as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if hasattr(m, "attention_biases"):
                m.attention_biases.copy_(torch.randn(m.attention_biases.shape, generator=g) * 0.5)
    return model


def save_hf(path, key: str) -> str:
    """Write the tiny Hugging Face model ``key`` (and its image processor) to ``path`` with save_pretrained;
    skips the test when transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    prefix = ZOO[key].name
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**{
        **dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, num_labels=10, initializer_range=0.2), **ZOO[key].kwargs})
    model = getattr(transformers, f"{prefix}ForImageClassification")(cfg)
    with torch.no_grad():  # relative position bias tables start at zero: random, so the bias path is exercised
        for m in model.modules():
            if isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter):
                m.relative_position_bias_table.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    own = prefix in ("ViT", "DeiT")  # the others: ViT's processor (vitq reads only its JSON)
    proc = getattr(transformers, f"{prefix}ImageProcessor") if own else transformers.ViTImageProcessor
    extra = {"do_center_crop": False} if prefix == "DeiT" else {}
    proc(size={"height": 32, "width": 32}, **extra).save_pretrained(path)
    return str(path)


_HF_DIRS: dict[str, str] = {}


def hf_folder(key: str) -> str:
    """A folder holding the tiny Hugging Face model ``key``, written once per test session."""
    if key not in _HF_DIRS:
        path = tempfile.mkdtemp(prefix=f"vitq-{key}-")
        atexit.register(shutil.rmtree, path, True)
        _HF_DIRS[key] = save_hf(path, key)
    return _HF_DIRS[key]


def tiny_model(key: str, seed: int = 0) -> nn.Module:
    """The tiny model ``key`` of :data:`ZOO`, random-init with ``seed``, in eval mode."""
    z = ZOO[key]
    if z.family.startswith("hf-"):
        from vitq.models.loading import create_model

        return create_model(f"hf:{hf_folder(key)}")
    torch.manual_seed(seed)
    return randomize(timm.create_model(z.name, pretrained=False, **z.kwargs).eval(), seed)


def tiny_images(key: str, n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` generated images [n, 3, size, size] for the tiny model ``key``."""
    size = ZOO[key].size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
