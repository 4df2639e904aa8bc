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


def gen(name: str, kwargs: dict, size: int = 32) -> Tiny:
    """A tiny model of the generic path: timm's pretrained_cfg told the size it is built for (the generic path
    traces a model at that size; a tiny model built smaller than its pretrained size would not run there)."""
    return Tiny("generic", name, {**kwargs, "pretrained_cfg_overlay": {"input_size": (3, size, size)}}, size)


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
    # ---- families helper: LayerScale ViTs (DeiT-III; DINOv2 with 4 register tokens, LayerScale 0.1 as a trained
    # model has it rather than timm's 1e-5) in the timm-vit family, and the dedicated families of
    # src/vitq/models/{cait,convnext}.py
    "deit3": Tiny("timm-vit", "deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64,
                                                              num_heads=2, num_classes=10)),
    "dinov2_reg": Tiny("timm-vit", "vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7, depth=2,
                                                                         embed_dim=64, num_heads=2, init_values=0.1,
                                                                         num_classes=10), size=28),
    "cait": Tiny("timm-cait", "cait_xxs24_224", dict(img_size=32, patch_size=8, depth=2, depth_token_only=1,
                                                     embed_dim=64, num_heads=2, init_values=0.1, num_classes=10)),
    "eva02": Tiny("timm-eva", "eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, depth=2, embed_dim=64,
                                                             num_heads=2, num_classes=10), size=28),
    "convnext": Tiny("timm-convnext", "convnext_atto", dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1),
                                                            ls_init_value=0.1, num_classes=10)),
    "convnext_convmlp": Tiny("timm-convnext", "convnext_atto", dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                                                    conv_mlp=True, num_classes=10)),
    # ---- end of the families helper's block
    # --- the generic path (family "generic", matmul only): architectures no dedicated family knows, one tiny
    # variant each; their blocks, attention modules and BatchNorms are whatever timm builds (ConvNeXt blocks,
    # EVA rotary attention, CaiT class attention, XCiT cross-covariance attention, CrossViT's two branches,
    # EfficientFormer's 4-D attention, MobileViT, FastViT's reparameterizable blocks, TinyViT, RepVGG, GhostNet,
    # LeViT's conv variant, EfficientViT's linear attention, ConViT's gated positional attention)
    "g_xcit": gen("xcit_nano_12_p16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32,
                                                           num_heads=2, cls_attn_layers=1, num_classes=10)),
    "g_crossvit": gen("crossvit_tiny_240", dict(img_size=48, img_scale=(1.0, 1.0), patch_size=[12, 16],
                                                            embed_dim=[16, 32], depth=[[1, 1, 0]], num_heads=[2, 2],
                                                            mlp_ratio=[2, 2, 1], num_classes=10), size=48),
    "g_convit": gen("convit_tiny", dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1,
                                                    embed_dim=16, num_heads=2, num_classes=10)),
    "g_efficientformer": gen("efficientformer_l1", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
                                                                    num_vit=1, num_classes=10), size=224),
    "g_mobilevit": gen("mobilevit_xxs", dict(num_classes=10), size=64),
    "g_fastvit": gen("fastvit_sa12", dict(layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64),
                                                      num_classes=10), size=64),
    "g_tinyvit": gen("tiny_vit_5m_224", dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1),
                                                         num_heads=(1, 2, 2, 3), num_classes=10), size=64),
    "g_repvgg": gen("repvgg_a0", dict(num_classes=10)),
    "g_ghostnet": gen("ghostnet_050", dict(num_classes=10)),
    "g_levit_conv": gen("levit_conv_128s", dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8,
                                                            num_heads=(2, 3, 4), depth=(1, 1, 1), num_classes=10),
                         size=64),
    "g_efficientvit": gen("efficientvit_b0", dict(num_classes=10), size=64),
    # --- end of the generic path's block
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
# (the LayerScale ViTs are left out: tests/models/test_layerscale.py and the zoo test cover them, and every test
# over TINY would run twice as long)
TINY = {k: (z.name, z.kwargs) for k, z in ZOO.items() if z.family == "timm-vit" and k not in ("deit3", "dinov2_reg")}


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
