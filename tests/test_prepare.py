"""Preparing tiny timm models of each family under both schemes."""

import pytest
import timm
import torch
from conftest import TINY, tiny_images, tiny_model

import vitq
from vitq.errors import VitqError
from vitq.models.timm_vit import QAttention, QWindowAttention
from vitq.models.trunk import Trunk
from vitq.quant.base import quantizers_of
from vitq.quant.modules import QLinear
from vitq.quant.uniform import PTFQuantizer
from vitq.scheme import Override, Scheme


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("scheme", ["fq", "matmul"])
def test_uncalibrated_prepared_model_equals_float(family, scheme):
    model = tiny_model(family)
    x = tiny_images(family, 2)
    q = vitq.prepare(model, Scheme(scheme, 4, 4))
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=1e-5)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())  # every Linear was swapped
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the user's model is untouched


@pytest.mark.parametrize("family", sorted(TINY))
def test_roles_by_scheme(family):
    model = tiny_model(family)
    roles = {s: {q.role for q in quantizers_of(vitq.prepare(model, Scheme(s))).values()} for s in ("fq", "matmul")}
    assert {"weight", "linear_input", "image", "q", "k", "v", "softmax"} <= roles["matmul"]
    assert not {"scores", "residual", "norm_input"} & roles["matmul"]  # softmax/LN/residual stay float
    assert {"scores", "residual", "norm_input"} <= roles["fq"]


def test_attention_modules_are_built_from_timm():
    q = vitq.prepare(tiny_model("deit"), Scheme("fq"))
    assert isinstance(q.blocks[0].attn, QAttention) and isinstance(q.blocks[0].attn.qkv, QLinear)
    swin = tiny_model("swin")
    qs = vitq.prepare(swin, Scheme("fq"))
    attn = qs.layers[0].blocks[1].attn
    assert isinstance(attn, QWindowAttention)
    assert torch.equal(attn.relative_position_bias_table, swin.layers[0].blocks[1].attn.relative_position_bias_table)
    assert qs.layers[0].blocks[1].attn_mask is not None  # the shifted block keeps timm's mask


def test_bits_overrides_and_weight_granularity():
    scheme = Scheme("fq", 4, 6, attn_bits=8, overrides=(Override.parse("head:w8a8"),))
    q = vitq.prepare(tiny_model("deit"), scheme)
    assert q.head.weight_quant.bits == 8 and q.head.input_quant.bits == 8
    assert q.blocks[0].mlp.fc1.weight_quant.bits == 4 and q.blocks[0].mlp.fc1.input_quant.bits == 6
    assert q.blocks[0].attn.softmax_quant.bits == 8 and q.blocks[0].attn.q_quant.bits == 6
    assert q.blocks[0].attn.qkv.weight_quant.scale.shape == (q.blocks[0].attn.qkv.out_features,)
    # DeiT's class token has its own residual / final-norm quantizer (vitq.quant.modules.PrefixSplit)
    for split in (q.blocks[0].res_quant1, q.norm.input_quant):
        assert isinstance(split.prefix_quant, PTFQuantizer) and isinstance(split.token_quant, PTFQuantizer)
        assert split.num_prefix == 1 and split.token_quant.bits == split.prefix_quant.bits == 6
    assert q.patch_embed.proj.input_quant.bits == 8  # the image enters at 8 bits by default


@pytest.mark.parametrize("bad", [dict(w_bits=9), dict(w_bits=1), dict(a_bits=2), dict(a_bits=16),
                                 dict(name="int8"), dict(attn_bits=2)])
def test_scheme_rejects_bad_settings(bad):
    with pytest.raises(VitqError):
        Scheme(**bad)


def test_override_parse_and_roundtrip():
    o = Override.parse("blocks.*.mlp.fc2:a8")
    assert (o.pattern, o.w_bits, o.a_bits) == ("blocks.*.mlp.fc2", None, 8)
    s = Scheme("matmul", 4, 4, overrides=(o, Override.parse("head:w8a8")))
    assert Scheme.from_dict(s.to_dict()) == s
    with pytest.raises(VitqError, match="bad override"):
        Override.parse("head")


def test_unsupported_modules_are_named():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=64, num_heads=2, qk_norm=True, num_classes=10)
    with pytest.raises(VitqError, match=r"q_norm"):
        vitq.prepare(model, Scheme("fq"))

    class WithConv1d(torch.nn.Module):  # no family knows it: the generic path takes it and refuses the Conv1d
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.conv = torch.nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.fc(x[:, 0, 0, :4]).unsqueeze(-1)).flatten(1)

    with pytest.raises(VitqError, match=r"unsupported module conv \(Conv1d\)"):
        vitq.prepare(WithConv1d(), Scheme("matmul"))

    class NoForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(VitqError, match=r"NoForward: vitq's generic path runs the model once"):
        vitq.prepare(NoForward(), Scheme("matmul"))


@pytest.mark.parametrize("family", sorted(TINY))
def test_trunk_forward_from_matches_full_forward(family):
    q = vitq.prepare(tiny_model(family), Scheme("fq", 6, 6))
    x = tiny_images(family, 4)
    vitq.calibrate(q, x, "minmax", progress=False)
    t = Trunk(q)
    with torch.no_grad():
        ref = q(x)
        for i in range(len(t) + 1):
            assert torch.equal(t.forward_from(i, t.input_of(i, x)), ref)
    assert len(t.blocks()) == 2 * (2 if family == "swin" else 1)
