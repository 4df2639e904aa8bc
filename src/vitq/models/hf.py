"""Hugging Face ``transformers`` ViT, DeiT, DINOv2 and BEiT classifiers (``ViTForImageClassification``,
``DeiTForImageClassification``, ``Dinov2ForImageClassification``, ``BeitForImageClassification``) as a second model
source: ``--model hf:DIR`` loads a folder written by ``save_pretrained`` (model and image processor), wrapped in
:class:`HFImageClassifier` so it returns logits like a timm model, with the image processor's preprocessing
expressed as a timm data config (ConvNeXt, loaded the same way, is the family of :mod:`vitq.models.hf_convnext`).

Quantized modules are built from HF's own modules (no model code copied, no ``forward`` patched):
:class:`QHFAttention` from the ``*Attention`` modules (reusing q_proj, k_proj, v_proj, o_proj, the head count and
scaling; an additive float mask such as BEiT's relative position bias is added to the scores),
:class:`QHFLayer` from ``ViTLayer``/``DeiTLayer``, :class:`QHFLayerScaleLayer` from ``Dinov2Layer`` and
:class:`QHFBeitLayer` from ``BeitLayer`` (LayerScale stays in float). What is quantized under each scheme is what
the timm ViT family quantizes. ``transformers`` is an optional extra: ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.common import swap_weighted
from vitq.models.family import Family, TrunkParts, group_paths, register_family
from vitq.quant.base import Quantizer
from vitq.quant.modules import QAttentionBase, QLayerNorm, QTransformerBlock, split_prefix
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme

VIT_CLASSES = ("ViTForImageClassification", "DeiTForImageClassification", "Dinov2ForImageClassification",
               "BeitForImageClassification")
SUPPORTED = (*VIT_CLASSES, "ConvNextForImageClassification")  # the last one: family hf-convnext
_ATTENTION = ("ViTAttention", "DeiTAttention", "Dinov2Attention", "BeitAttention")
_LAYER = ("ViTLayer", "DeiTLayer")
_LAYERSCALE_LAYER = ("Dinov2Layer",)
_BEIT_LAYER = ("BeitLayer",)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes of the image processor's ``resample``
INSTALL_HINT = "pip install -e '.[hf]'"


def _hf_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


class HFImageClassifier(nn.Module):
    """A Hugging Face image classifier that takes preprocessed images and returns logits (as timm models do).
    ``pretrained_cfg`` is its image processor's preprocessing in timm's terms, so vitq.data builds the
    same transform for it as for a timm model."""

    def __init__(self, hf_model: nn.Module, pretrained_cfg: dict):
        super().__init__()
        if type(hf_model).__name__ not in SUPPORTED:
            raise VitqError(f"Hugging Face model class {type(hf_model).__name__} is not supported (expected one "
                            f"of {', '.join(SUPPORTED)})")
        self.hf = hf_model
        self.pretrained_cfg = dict(pretrained_cfg)

    @property
    def base(self) -> nn.Module:
        return self.hf.base_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def data_config(path: str, image_size) -> dict:
    """The image processor config of a save_pretrained folder as a timm data config (input size,
    interpolation, crop_pct, crop_mode, mean, std)."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(cfg_path):
        raise VitqError(f"--model hf:{path}: no preprocessor_config.json (save the image processor with "
                        "save_pretrained into the same folder)")
    with open(cfg_path) as f:
        p = json.load(f)

    def bad(what: str) -> VitqError:
        return VitqError(f"{cfg_path}: {what} is not supported by vitq's preprocessing")

    if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise bad(f"rescale_factor {p.get('rescale_factor')} (expected 1/255)")
    if not p.get("do_resize", True):
        raise bad("do_resize false")
    resample = p.get("resample", 2)
    if resample not in _RESAMPLE:
        raise bad(f"resample {resample}")
    size = p.get("size", {})
    hw = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    crop = p.get("crop_size") if p.get("do_center_crop", False) else None
    if "height" in size and "width" in size:
        resize, mode = (int(size["height"]), int(size["width"])), "squash"
    elif "shortest_edge" in size:
        resize, mode = (int(size["shortest_edge"]),) * 2, "center"
    else:
        raise bad(f"size {size}")
    out = (int(crop["height"]), int(crop["width"])) if crop else resize
    if tuple(out) != tuple(int(v) for v in hw) or out[0] != out[1] or resize[0] != resize[1]:
        raise bad(f"size {size} / crop_size {crop} for a model of image size {hw} (expected square sizes that "
                  "give the model's image size)")
    normalize = p.get("do_normalize", True)
    return {"input_size": (3, out[0], out[1]), "interpolation": _RESAMPLE[resample],
            "crop_pct": out[0] / resize[0], "crop_mode": mode,
            "mean": tuple(p.get("image_mean", (0.5,) * 3)) if normalize else (0.0,) * 3,
            "std": tuple(p.get("image_std", (0.5,) * 3)) if normalize else (1.0,) * 3}


def load_hf(path: str) -> HFImageClassifier:
    """``hf:DIR``: a ViT/DeiT image classifier and its image processor config saved with save_pretrained."""
    try:
        import transformers
    except ImportError:
        raise VitqError(f"--model hf:{path} needs the transformers package ({INSTALL_HINT})") from None
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise VitqError(f"--model hf:{path}: expected a folder written by save_pretrained (with config.json)")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
    except Exception as e:  # unknown architecture, unreadable weights
        raise VitqError(f"--model hf:{path} could not be loaded ({type(e).__name__}: {str(e)[:160]})") from None
    return HFImageClassifier(model.eval(), data_config(path, model.config.image_size)).eval()


class _Aliased(nn.Module):
    """Reads and writes of the names in ``aliases`` go to the submodule they name, so the shared interfaces'
    attribute names reach HF's modules while the state-dict keys keep HF's names."""

    aliases: dict[str, str] = {}

    def __getattr__(self, name: str):
        return super().__getattr__(self.aliases.get(name, name))

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(self.aliases.get(name, name), value)


class QHFAttention(_Aliased, QAttentionBase):
    """Built from HF ``ViTAttention`` / ``DeiTAttention`` (eager attention computed by :class:`QAttentionBase`,
    scores as HF computes them, (q·kᵀ)·scaling). q, k and v have projections of their own (``q_proj``,
    ``k_proj``, ``v_proj``; ``qkv`` is None), ``proj`` is ``o_proj``. Returns (output, None) like HF's."""

    scale_first = False
    aliases = {"proj": "o_proj"}

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        if getattr(attn, "is_causal", False):
            raise VitqError(f"causal {type(attn).__name__} is not supported")
        self.num_heads, self.head_dim, self.scale = attn.num_attention_heads, attn.head_dim, attn.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qkv = None
        self.attn_drop, self.proj_drop = nn.Identity(), nn.Identity()
        self._init_quantizers(scheme, a_bits, softmax_bits)

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``attention_mask``: an additive float bias of the scores (BEiT's relative position bias), added
        before the (fq) score quantizer."""
        if attention_mask is None:
            return self._attend(hidden_states), None
        if not attention_mask.is_floating_point():
            raise VitqError("boolean attention masks are not supported by the quantized HF attention")
        q, k, v = self._qkv(hidden_states)
        return self._softmax_v(self._scores(q, k) + attention_mask, v), None


class QHFLayer(_Aliased, QTransformerBlock):
    """Built from HF ``ViTLayer`` / ``DeiTLayer`` (pre-norm block). In the fq regime the residual stream is
    quantized (PTF) where it enters each LayerNorm, and the quantized value also feeds the skip. ``norm1``,
    ``attn`` and ``norm2`` are HF's ``layernorm_before``, ``attention`` and ``layernorm_after``; not
    ``sequential`` (HF's attention returns a tuple, and there is no ls1/ls2/drop_path)."""

    sequential = False
    aliases = {"norm1": "layernorm_before", "attn": "attention", "norm2": "layernorm_after"}

    def __init__(self, layer: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("attention", "layernorm_before", "layernorm_after", "mlp", "dropout"):
            setattr(self, name, getattr(layer, name))
        self._init_residual(res_quant1, res_quant2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        x = self.res_quant1(hidden_states)
        attn, _ = self.attention(self.layernorm_before(x), attention_mask)
        x = x + self.dropout(attn)
        x = self.res_quant2(x)
        return x + self.dropout(self.mlp(self.layernorm_after(x)))


class QHFLayerScaleLayer(_Aliased, QTransformerBlock):
    """Built from HF ``Dinov2Layer`` (pre-norm block with LayerScale: ``norm1``, ``attention``,
    ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp`` (MLP or SwiGLU), ``layer_scale2``). Residual
    quantizers as :class:`QHFLayer`; the LayerScale multipliers stay in float."""

    sequential = False
    aliases = {"attn": "attention"}

    def __init__(self, layer: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2"):
            setattr(self, name, getattr(layer, name))
        self._init_residual(res_quant1, res_quant2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        x = self.res_quant1(hidden_states)
        attn, _ = self.attention(self.norm1(x), attention_mask)
        x = x + self.drop_path(self.layer_scale1(attn))
        x = self.res_quant2(x)
        return x + self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class QHFBeitLayer(_Aliased, QTransformerBlock):
    """Built from HF ``BeitLayer``: as :class:`QHFLayer`, with LayerScale (``lambda_1``, ``lambda_2``, in
    float) and the layer's own relative position bias (``BeitRelativePositionBias``, for the window of the size
    the model was built for) added to the attention scores."""

    sequential = False
    aliases = {"norm1": "layernorm_before", "attn": "attention", "norm2": "layernorm_after"}

    def __init__(self, layer: nn.Module, res_quant1: Quantizer | None, res_quant2: Quantizer | None):
        super().__init__()
        for name in ("attention", "layernorm_before", "layernorm_after", "mlp", "dropout", "drop_path",
                     "relative_position_bias", "lambda_1", "lambda_2"):
            setattr(self, name, getattr(layer, name))
        self._init_residual(res_quant1, res_quant2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *_, **kwargs):
        bias = self.relative_position_bias
        if bias is not None:
            rel = bias(bias.window_size, False, dim_size=None)
            attention_mask = rel if attention_mask is None else rel + attention_mask
        x = self.res_quant1(hidden_states)
        h = self.dropout(self.attention(self.layernorm_before(x), attention_mask)[0])
        x = x + self.drop_path(h if self.lambda_1 is None else self.lambda_1 * h)
        x = self.res_quant2(x)
        h = self.dropout(self.mlp(self.layernorm_after(x)))
        return x + self.drop_path(h if self.lambda_2 is None else self.lambda_2 * h)


def detect(model: nn.Module) -> bool:
    return isinstance(model, HFImageClassifier) and type(model.hf).__name__ in VIT_CLASSES


def _layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return "layers", base.layers
    encoder = getattr(base, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return "encoder.layer", encoder.layer
    raise VitqError(f"{type(base).__name__}: no transformer layers found (this transformers version is not "
                    "supported)")


def convert(model: HFImageClassifier, scheme: Scheme) -> None:
    base = model.base
    base_name = f"hf.{model.hf.base_model_prefix}"
    lname, layers = _layers(base)
    emb = base.embeddings
    prefix = sum(getattr(emb, t, None) is not None for t in ("cls_token", "distillation_token"))
    for i, layer in enumerate(layers):
        name = f"{base_name}.{lname}.{i}"
        scaled, beit = _hf_class(layer, _LAYERSCALE_LAYER), _hf_class(layer, _BEIT_LAYER)
        if not (scaled or beit or _hf_class(layer, _LAYER)) or not _hf_class(layer.attention, _ATTENTION):
            raise VitqError(f"unsupported Hugging Face layer {name} ({type(layer).__name__}); supported: "
                            f"{', '.join(_LAYER + _LAYERSCALE_LAYER + _BEIT_LAYER)} with {', '.join(_ATTENTION)}")
        _, a, s = scheme.bits_for(f"{name}.attention")
        layer.attention = QHFAttention(layer.attention, scheme, a, s)
        _, a, _ = scheme.bits_for(name)
        r1 = r2 = None
        if scheme.fully_quantized:  # class (and distillation) tokens with their own range, as in timm_vit
            n1, n2 = (layer.norm1, layer.norm2) if scaled else (layer.layernorm_before, layer.layernorm_after)
            r1 = split_prefix(PTFQuantizer(a, "residual", num_channels=n1.normalized_shape[0]), prefix, max_shift=0)
            r2 = split_prefix(PTFQuantizer(a, "residual", num_channels=n2.normalized_shape[0]), prefix, max_shift=0)
        layers[i] = (QHFLayerScaleLayer if scaled else QHFBeitLayer if beit else QHFLayer)(layer, r1, r2)
    if getattr(base, "shared_position_bias", None) is not None:
        raise VitqError(f"{base_name}.shared_position_bias (BeitRelativePositionBias shared by all layers) is not "
                        "supported; supported: BEiT with per-layer relative position bias or none")
    if scheme.fully_quantized:
        for owner, attr in ((base, "layernorm"), (getattr(base, "pooler", None), "layernorm")):
            if isinstance(getattr(owner, attr, None), nn.LayerNorm):
                setattr(owner, attr, QLayerNorm(getattr(owner, attr), scheme.bits_for(f"{base_name}.{attr}")[1]))
        if isinstance(getattr(base, "layernorm", None), QLayerNorm):  # every token: the prefix with its own range
            base.layernorm.input_quant = split_prefix(base.layernorm.input_quant, prefix, max_shift=0)
    image = {f"{base_name}.embeddings.patch_embeddings.projection"}
    swap_weighted(model, scheme, image_layers=image)


def trunk(model: HFImageClassifier) -> TrunkParts:
    base = model.base
    lname, layers = _layers(base)
    prefix = f"hf.{model.hf.base_model_prefix}.{lname}"

    pooled = type(model.hf).__name__ == "Dinov2ForImageClassification"
    pooler = getattr(base, "pooler", None)  # BEiT: mean of the patch tokens (+ LayerNorm) or the [CLS] token

    def tail(h: torch.Tensor) -> torch.Tensor:  # the [CLS] token (Dinov2: and the mean of the patch tokens)
        h = base.layernorm(h)
        if pooler is not None:
            return model.hf.classifier(pooler(h))
        return model.hf.classifier(torch.cat([h[:, 0], h[:, 1:].mean(1)], 1) if pooled else h[:, 0, :])

    return TrunkParts(stem=base.embeddings, units=[(f"{prefix}.{i}", m) for i, m in enumerate(layers)], tail=tail,
                      is_block=lambda m: hasattr(m, "attention"))


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """HF layers: ``attn`` = q/k/v/o projection weight scales, ``mlp`` = fc1/fc2."""
    if not isinstance(unit, (QHFLayer, QHFLayerScaleLayer, QHFBeitLayer)):
        return None
    return group_paths(unit, {"attn": "attention", "mlp": "mlp"}, groups)


register_family(Family(
    name="hf-vit",
    description="Hugging Face transformers ViTForImageClassification / DeiTForImageClassification / "
                "Dinov2ForImageClassification / BeitForImageClassification "
                f"(--model hf:DIR, a save_pretrained folder; {INSTALL_HINT}); one trunk unit per layer",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths,
    float_ok=("ViTEmbeddings", "DeiTEmbeddings", "Dinov2Embeddings", "Dinov2LayerScale", "BeitEmbeddings",
              "BeitRelativePositionBias"),
    quantizes={
        "fq": "as timm-vit: weights per output channel (uint), every linear input, q/k/v, attention scores, "
              "softmax output, LayerNorm inputs and the residual stream (PTF)",
        "matmul": "as timm-vit: weights per output channel (int), every linear input, q/k/v and softmax output; "
                  "softmax and LayerNorm in float",
    },
))
