"""timm ViT / DeiT / Swin (and any model built from timm's ``Attention``, ``Block``, ``WindowAttention``,
``SwinTransformerBlock``): the conversion in :mod:`vitq.prepare` and the trunk in :mod:`vitq.models.trunk`. Tried
after every other family, so it also takes models it then refuses module by module."""

from __future__ import annotations

from torch import nn

from vitq.models.family import Family, register_family


def convert(model: nn.Module, scheme) -> None:
    from vitq.prepare import _convert

    _convert(model, "", scheme, in_block=False)


register_family(Family(
    name="timm-vit",
    description="timm VisionTransformer (ViT, DeiT) and SwinTransformer, or any model built from their "
                "Attention/Block/WindowAttention/SwinTransformerBlock",
    detect=lambda model: True, convert=convert, trunk=None, fallback=True,
    quantizes={
        "fq": "weights per output channel (uint), every linear input, q/k/v, attention scores, softmax output, "
              "LayerNorm inputs and the residual stream (PTF)",
        "matmul": "weights per output channel (int), every linear input, q/k/v and softmax output (both "
                  "attention-matmul inputs); softmax and LayerNorm in float",
    },
))
