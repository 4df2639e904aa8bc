"""timm EVA / EVA-02 (``Eva``): pre-norm blocks whose attention rotates q and k by rotary position embeddings
(RoPE), with a SwiGLU MLP and optional LayerScale and inner LayerNorms. Its quantized modules, the conversion,
the trunk and Evol-Q's search paths.

q and k are quantized *after* the rotation, where they enter the q·kᵀ matmul (the rotation itself, a fixed
elementwise sin/cos mix, stays float, in the exported graph too). The separate q/v biases of a fused ``qkv``
are added after the quantized projection. Under fq the residual stream (class token with its own range),
every LayerNorm input (inner ones included) and the scores are quantized as in the timm ViT family.
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.cait import Scale
from vitq.models.family import Family, TrunkParts, group_paths, register_family
from vitq.quant.modules import QAttentionBase, QConv2d, QLayerNorm, QLinear, QTransformerBlock, split_prefix
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Scheme


class QEvaAttention(QAttentionBase):
    """Built from timm's ``EvaAttention`` (fused ``qkv`` with separate biases, or ``q_proj``/``k_proj``/
    ``v_proj``); ``forward(x, rope)`` rotates q and k of the patch tokens, then quantizes them."""

    def __init__(self, attn: nn.Module, scheme: Scheme, a_bits: int, softmax_bits: int):
        super().__init__()
        for feat in ("q_norm", "k_norm"):
            if not isinstance(getattr(attn, feat), nn.Identity):
                raise VitqError(f"EvaAttention with {feat} ({type(getattr(attn, feat)).__name__}) is not supported")
        if getattr(attn, "gate", None) is not None:
            raise VitqError("EvaAttention with a gate is not supported")
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.num_prefix_tokens, self.rotate_half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
        self.qkv, self.q_proj, self.k_proj, self.v_proj = attn.qkv, attn.q_proj, attn.k_proj, attn.v_proj
        self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
        if attn.k_bias is not None:
            self.register_buffer("k_bias", attn.k_bias, persistent=False)
        else:
            self.k_bias = None
        self.qkv_bias_separate = attn.qkv_bias_separate
        self.norm, self.proj = attn.norm, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self._init_quantizers(scheme, a_bits, softmax_bits)

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        if self.qkv is None:
            heads = lambda t: t.reshape(B, N, self.num_heads, -1).transpose(1, 2)  # noqa: E731
            return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat

        n = self.num_prefix_tokens
        return torch.cat([t[:, :, :n], apply_rot_embed_cat(t[:, :, n:], rope, half=self.rotate_half)], dim=2)

    def _softmax_v(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The base class's step with the inner LayerNorm (``norm``) before the output projection."""
        attn = self.softmax_quant(self.score_quant(scores).softmax(dim=-1))
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        return self.proj_drop(self.proj(self.norm(x)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask=None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        q, k, v = self._project(x)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        return self._softmax_v(self._scores(q, k), v)


class QEvaBlock(QTransformerBlock):
    """Built from timm's ``EvaBlock``; ``forward(x, rope)`` as timm's, with the residual quantizers (fq)."""

    sequential = False  # the attention needs the rotary embedding

    def __init__(self, block: nn.Module, res_quant1: nn.Module | None, res_quant2: nn.Module | None):
        super().__init__()
        for name in ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.ls1 = Scale(block.gamma_1) if block.gamma_1 is not None else nn.Identity()
        self.ls2 = Scale(block.gamma_2) if block.gamma_2 is not None else nn.Identity()
        self._init_residual(res_quant1, res_quant2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask=None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitqError("attention masks / causal attention are not supported")
        x = self.res_quant1(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope)))
        x = self.res_quant2(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class EvaUnit(nn.Module):
    """A trunk unit: one block with the model's rotary embedding (tokens in, tokens out). Holds the block as
    ``block`` (quantizer names inside the unit start with ``block.``)."""

    def __init__(self, block: QEvaBlock, model: nn.Module):
        super().__init__()
        self.block = block
        self.attn = block.attn  # a unit with an attention: block-wise searches work on it
        self._model = [model]  # not a submodule (the model owns the unit's block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, rope=rope_of(self._model[0]))


def _classes():
    from timm.models.eva import Eva, EvaAttention, EvaBlock

    return Eva, EvaAttention, EvaBlock


def detect(model: nn.Module) -> bool:
    return type(model).__name__ == "Eva" and type(model) is _classes()[0]


def rope_of(model: nn.Module) -> torch.Tensor | None:
    """The rotary embedding the blocks get (what ``Eva._pos_embed`` computes for a fixed input size)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


def convert_children(module: nn.Module, prefix: str, scheme: Scheme, num_prefix: int) -> None:
    _, EvaAttention, EvaBlock = _classes()
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        w, a, s = scheme.bits_for(name)
        convert_children(child, name + ".", scheme, num_prefix)
        new = None
        if isinstance(child, nn.Linear):
            new = QLinear(child, w, a, scheme.signed_weights, scheme)
        elif isinstance(child, nn.Conv2d):
            if not name.endswith("patch_embed.proj"):
                raise VitqError(f"convolution {name} in an Eva model is not supported (expected the patch embedding)")
            new = QConv2d(child, w, scheme.input_bits, scheme.signed_weights, "image", scheme)
        elif type(child) is EvaAttention:
            new = QEvaAttention(child, scheme, a, s)
        elif type(child) is EvaBlock:
            r1 = r2 = None
            if scheme.fully_quantized:
                dim = child.norm1.normalized_shape[0]
                r1, r2 = (split_prefix(PTFQuantizer(a, "residual", num_channels=dim), num_prefix, max_shift=0)
                          for _ in range(2))
            new = QEvaBlock(child, r1, r2)
        elif isinstance(child, nn.LayerNorm) and scheme.fully_quantized and not (
                type(module) is EvaBlock and child_name in ("norm1", "norm2")):
            new = QLayerNorm(child, a)
            if prefix == "" and child_name in ("norm_pre", "norm"):  # the model's token tensors
                new.input_quant = split_prefix(new.input_quant, num_prefix, max_shift=0)
            elif prefix == "" and child_name == "fc_norm":  # after the pooling: one range (see timm_vit.PREFIX_PTF)
                new.input_quant = PTFQuantizer(a, "norm_input", num_channels=child.normalized_shape[0], max_shift=0)
        if new is not None:
            setattr(module, child_name, new)


def convert(model: nn.Module, scheme: Scheme) -> None:
    if model.dynamic_img_size or getattr(model, "rope_mixed", False):
        raise VitqError("Eva with dynamic_img_size or mixed (per-depth) rotary embeddings is not supported")
    if type(model.blocks[0]) is not _classes()[2]:
        raise VitqError(f"Eva with {type(model.blocks[0]).__name__} blocks is not supported (expected EvaBlock)")
    convert_children(model, "", scheme, int(model.num_prefix_tokens))


def trunk(model: nn.Module) -> TrunkParts:
    """One :class:`EvaUnit` per block; stem: patch embedding, position embedding, ``norm_pre``."""
    return TrunkParts(stem=lambda x: model.norm_pre(model._pos_embed(model.patch_embed(x))[0]),
                      units=[(f"blocks.{i}", EvaUnit(b, model)) for i, b in enumerate(model.blocks)],
                      tail=lambda x: model.forward_head(model.norm(x)),
                      is_block=lambda m: isinstance(m, EvaUnit))


def search_paths(unit: nn.Module, groups: set[str]) -> list[str] | None:
    """Eva units: ``attn`` = the q/k/v and output projections, ``mlp`` = the SwiGLU's layers."""
    if not isinstance(unit, EvaUnit):
        return None
    return group_paths(unit, {"attn": "block.attn", "mlp": "block.mlp"}, groups)


register_family(Family(
    name="timm-eva",
    description="timm EVA / EVA-02 (rotary position embeddings, SwiGLU MLP, LayerScale)",
    detect=detect, convert=convert, trunk=trunk, search_paths=search_paths, float_ok=("Scale",),
    quantizes={
        "fq": "weights per output channel (uint), every linear input, q and k after the rotary embedding, v, "
              "attention scores, softmax output, LayerNorm inputs (inner ones too) and the residual stream (PTF; "
              "the class token with its own range)",
        "matmul": "weights per output channel (int), every linear input, q and k after the rotary embedding, v "
                  "and softmax output (both attention-matmul inputs); rotary embedding, softmax and LayerNorm in "
                  "float",
    },
))
