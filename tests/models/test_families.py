"""Model families beyond timm ViT/Swin: timm CNNs (BatchNorm folding), timm LeViT, Hugging Face ViT/DeiT."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, make_image_folder
from torch import nn
from zoo import HF_KEYS, ZOO, randomize, save_hf, tiny_model

from vitq import api
from vitq.errors import VitqError
from vitq.models.common import QConv2dSame, quantized_weighted
from vitq.models.family import FAMILIES, family_of
from vitq.models.fold import fold_batchnorms
from vitq.models.trunk import Trunk
from vitq.prepare import prepare
from vitq.quant.base import quantizers_of
from vitq.quant.modules import QAttentionBase, QTransformerBlock
from vitq.refine.evolq_search import search_space
from vitq.scheme import Scheme
from vitq.state import load, save

# the tiny models of tests/zoo.py beyond timm ViT/Swin: (timm name, kwargs, input size)
TINY_TIMM = {k: (z.name, z.kwargs, z.size) for k, z in ZOO.items() if z.family in ("timm-cnn", "timm-levit")}
HF = HF_KEYS
FAMS = (*TINY_TIMM, *HF)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {k: save_hf(tmp_path_factory.mktemp(k), k) for k in HF}


def build(fam: str, hf_dirs=None) -> tuple[nn.Module, int]:
    if fam in HF:
        from vitq.models.loading import create_model

        return create_model(f"hf:{hf_dirs[fam]}"), 32
    return tiny_model(fam), ZOO[fam].size


def images(size: int, n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def smooth_images(size: int, n: int, seed: int = 1) -> torch.Tensor:
    """Image-like generated data: smooth random fields plus a little pixel noise. (On white noise a random-init
    MobileNetV3's top two logits are nearly tied for most images, so top-1 agreement would measure ties.)"""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 1.5 + 0.3 * torch.randn(
        n, 3, size, size, generator=g)


def get(request, fam):
    """The tiny model of a family; the HF folders (and transformers) only for the HF families."""
    return build(fam, request.getfixturevalue("hf_dirs") if fam in HF else None)


# ------------------------------------------------------------------------------------------------ folding
def test_batchnorm_folding_is_exact_per_output_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Flatten(),
                        nn.BatchNorm1d(8 * 16), nn.Linear(8 * 16, 6), nn.BatchNorm1d(6)).eval()
    randomize(net)
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        ref = net(x)
        info = fold_batchnorms(net, x)
        out = net(x)
    assert info["folded"] == {"1": "0", "4": "3", "6": "7", "8": "7"}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert info["reads_image"] == ["0"]


def test_batchnorm_that_cannot_be_folded_is_named():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    randomize(net)
    with pytest.raises(VitqError, match="BatchNorm 0 "):
        fold_batchnorms(net, torch.randn(1, 3, 8, 8))


def test_conv_subclass_with_its_own_forward_is_refused():
    from timm.layers import Conv2dSame, StdConv2d

    with pytest.raises(VitqError, match="stem.conv .*StdConv2d"):
        quantized_weighted("stem.conv", StdConv2d(3, 4, 3), Scheme("fq"))
    assert isinstance(quantized_weighted("c", Conv2dSame(3, 4, 3, stride=2), Scheme("fq")), QConv2dSame)


def test_levit_conv_variant_goes_to_the_generic_path_which_refuses_fq_by_name():
    m = timm.create_model("levit_conv_128s", img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
                          depth=(1, 1, 1), num_classes=10)
    assert family_of(m).name == "generic"
    with pytest.raises(VitqError, match="generic"):
        prepare(m, Scheme("fq"))


# ------------------------------------------------------------------------------------------- per family
@pytest.mark.parametrize("fam", FAMS)
def test_family_detected_and_listed(request, fam):
    model, _ = get(request, fam)
    expected = {"resnet": "timm-cnn", "regnet": "timm-cnn", "effnet": "timm-cnn", "mbv3": "timm-cnn",
                "levit": "timm-levit", "hf_vit": "hf-vit", "hf_deit": "hf-vit", "hf_dinov2": "hf-vit",
                "hf_beit": "hf-vit", "hf_convnext": "hf-convnext"}[fam]
    assert family_of(model).name == expected
    assert set(FAMILIES[expected].quantizes) == {"fq", "matmul"}


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
@pytest.mark.parametrize("fam", FAMS)
def test_prepare_with_quantizers_off_keeps_float_outputs(request, fam, scheme):
    model, size = get(request, fam)
    x = images(size, 8)
    q = prepare(model, Scheme(scheme))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())
    roles = {qq.role for qq in quantizers_of(q).values()}
    assert {"weight", "linear_input", "image"} <= roles
    assert ("residual" in roles) == (scheme == "fq")
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), float((out - ref).abs().max())


AGREEMENT = [(f, s) for f in FAMS for s in ("fq", "matmul") if not (f in HF and s == "fq")]


@pytest.mark.parametrize("fam,scheme", AGREEMENT)
def test_w8a8_minmax_agreement(request, fam, scheme):
    """(HF under fq: see test_hf_vit_quantizes_exactly_like_timm_vit. Under fq with minmax ranges a
    random-init ViT with a class token agrees 64-91 % with float on these images, timm's own DeiT included.)"""
    model, size = get(request, fam)
    x = smooth_images(size, 96)
    q = prepare(model, Scheme(scheme, 8, 8))
    api.calibrate(q, x[:32], "minmax", progress=False)
    assert all(bool(qq.initialized) for qq in quantizers_of(q).values())
    with torch.no_grad():
        agree = float((q(x[32:]).argmax(1) == model(x[32:]).argmax(1)).float().mean())
        low = prepare(model, Scheme(scheme, 2, 4))
        api.calibrate(low, x[:32], "minmax", progress=False)
        moved = float((low(x[32:]) - model(x[32:])).abs().mean())
    assert agree >= 0.9, agree
    assert moved > 0  # the quantizers are really in the path


@pytest.mark.parametrize("fam", FAMS)
def test_save_load_round_trip(request, tmp_path, fam):
    model, size = get(request, fam)
    x = images(size, 8)
    q = prepare(model, Scheme("fq", 6, 8))
    api.calibrate(q, x, "omse", progress=False)
    save(q, tmp_path)
    q2 = load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


UNITS = {
    "resnet": ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"],
    "effnet": ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0", "blocks.2.1", "blocks.3.0", "blocks.3.1",
               "blocks.3.2", "blocks.4.0", "blocks.4.1", "blocks.4.2", "blocks.5.0", "blocks.5.1", "blocks.5.2",
               "blocks.5.3", "blocks.6.0"],
    "levit": ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.2.downsample",
              "stages.2.blocks.0"],
    "hf_vit": ["hf.vit.layers.0", "hf.vit.layers.1"],
}


@pytest.mark.parametrize("fam", FAMS)
def test_trunk_units_are_the_blocks(request, fam):
    model, size = get(request, fam)
    x = images(size, 4)
    q = prepare(model, Scheme("fq"))
    api.calibrate(q, x, "minmax", progress=False)
    trunk = Trunk(q)
    if fam in UNITS:
        assert [n for n, _ in trunk.units] == UNITS[fam]
    assert len(trunk.blocks()) == len(trunk.units) > 0
    with torch.no_grad():
        full = q(x)
        for i in (0, len(trunk) // 2, len(trunk)):
            assert torch.allclose(trunk.forward_from(i, trunk.input_of(i, x)), full, atol=1e-5)


@pytest.mark.parametrize("fam", ["effnet", "levit", "hf_deit"])
def test_evolq_search_space_per_family(request, fam):
    model, size = get(request, fam)
    q = prepare(model, Scheme("fq", 4, 8))
    api.calibrate(q, images(size, 8), "minmax", progress=False)
    for _, name, block in Trunk(q).blocks():
        attn = [n for n, _ in search_space(name, block, ["attn"])]
        both = [n for n, _ in search_space(name, block, ["attn", "mlp"])]
        assert attn and all(n.startswith(name + ".") and n.endswith("weight_quant") for n in both)
        if fam == "effnet":  # a CNN block: all its convolution weight scales
            convs = [f"{name}.{n}.weight_quant" for n, m in block.named_modules() if isinstance(m, nn.Conv2d)
                     or type(m).__name__.startswith("QConv2d")]
            assert attn == both == convs
        else:
            assert set(attn) < set(both)


def test_evolq_refines_a_cnn(request):
    model, size = get(request, "resnet")
    x = images(size, 16)
    q = prepare(model, Scheme("fq", 4, 8))
    api.calibrate(q, x, "minmax", progress=False)
    info = api.refine(q, model, x, "evolq", batch_size=8, progress=False, passes=1, cycles=2, population=4,
                      sample=2)
    blocks = info["search_space"]["quantizers_per_block"]
    assert list(blocks) == list(reversed(UNITS["resnet"]))
    assert blocks["layer1.1"] == ["layer1.1.conv1.weight_quant", "layer1.1.conv2.weight_quant"]
    assert blocks["layer2.0"] == [f"layer2.0.{c}.weight_quant" for c in ("conv1", "conv2", "downsample.0")]
    assert info["fitness"]["final"] <= info["fitness"]["initial"] + 1e-9


# (family, block classes and their ``sequential``) of every quantized pre-norm block the family has
SHARED_BASES = {"deit": ("QBlock", True), "swin": ("QSwinBlock", False), "levit": None, "hf_vit": ("QHFLayer", False)}


@pytest.mark.parametrize("fam", sorted(SHARED_BASES))
def test_attention_and_blocks_derive_from_the_shared_bases(request, fam):
    """Every family's quantized attention is a QAttentionBase (its score bias where it has one); timm ViT/Swin
    and HF blocks are QTransformerBlocks, only ViT's QBlock ``sequential``."""
    model = tiny_model(fam) if fam in TINY else get(request, fam)[0]
    q = prepare(model, Scheme("fq"))
    attns = [m for m in q.modules() if "Attention" in type(m).__name__]
    assert attns and all(isinstance(m, QAttentionBase) for m in attns)
    biases = [m.score_bias() for m in attns]
    if fam == "deit" or fam == "hf_vit":
        assert all(b is None for b in biases)
    else:  # Swin's relative position bias, LeViT's attention biases: [1, H, Nq, N]
        assert all(b.dim() == 4 and b.shape[:2] == (1, m.num_heads) for b, m in zip(biases, attns, strict=True))
    blocks = [m for m in q.modules() if isinstance(m, QTransformerBlock)]
    if SHARED_BASES[fam] is None:
        assert not blocks
        return
    cls, sequential = SHARED_BASES[fam]
    assert blocks and all(type(b).__name__ == cls and b.sequential is sequential for b in blocks)
    assert all(isinstance(b.attn, QAttentionBase) and hasattr(b.mlp, "fc1") for b in blocks)


# ------------------------------------------------------------------------------------------- HF specifics
def test_hf_preprocessing_from_image_processor(tmp_path):
    from vitq.models.hf import data_config

    transformers = pytest.importorskip("transformers")
    transformers.DeiTImageProcessor().save_pretrained(tmp_path)  # resize 256x256 bicubic, crop 224
    cfg = data_config(str(tmp_path), 224)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_mode"] == "squash" and cfg["crop_pct"] == pytest.approx(224 / 256)
    with pytest.raises(VitqError, match="image size"):
        data_config(str(tmp_path), 32)


def test_hf_without_transformers_names_the_extra(tmp_path, monkeypatch):
    import sys

    from vitq.models.loading import create_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(VitqError, match=r"pip install -e '\.\[hf\]'"):
        create_model(f"hf:{tmp_path}")


def timm_twin(hf: nn.Module) -> nn.Module:
    """The timm VisionTransformer with the HF ViT's weights (same config: 32 px, patch 8, width 32, 2 layers)."""
    from functools import partial

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
                            norm_layer=partial(nn.LayerNorm, eps=1e-12)).eval()
    b = hf.vit
    sd = {"cls_token": b.embeddings.cls_token, "pos_embed": b.embeddings.position_embeddings,
          "patch_embed.proj.weight": b.embeddings.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": b.embeddings.patch_embeddings.projection.bias,
          "norm.weight": b.layernorm.weight, "norm.bias": b.layernorm.bias,
          "head.weight": hf.classifier.weight, "head.bias": hf.classifier.bias}
    for i, layer in enumerate(b.layers):
        a = layer.attention
        for t in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([getattr(p, t) for p in (a.q_proj, a.k_proj, a.v_proj)])
            sd[f"blocks.{i}.attn.proj.{t}"] = getattr(a.o_proj, t)
            sd[f"blocks.{i}.norm1.{t}"] = getattr(layer.layernorm_before, t)
            sd[f"blocks.{i}.norm2.{t}"] = getattr(layer.layernorm_after, t)
            sd[f"blocks.{i}.mlp.fc1.{t}"] = getattr(layer.mlp.fc1, t)
            sd[f"blocks.{i}.mlp.fc2.{t}"] = getattr(layer.mlp.fc2, t)
    vit.load_state_dict(sd, strict=True)
    return vit


@pytest.mark.parametrize("scheme", ["fq", "matmul"])
def test_hf_vit_quantizes_exactly_like_timm_vit(hf_dirs, scheme):
    model, size = build("hf_vit", hf_dirs)
    twin = timm_twin(model.hf)
    x = smooth_images(size, 48)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    qh, qt = prepare(model, Scheme(scheme, 8, 8)), prepare(twin, Scheme(scheme, 8, 8))
    api.calibrate(qh, x[:16], "minmax", progress=False)
    api.calibrate(qt, x[:16], "minmax", progress=False)
    with torch.no_grad():
        zh, zt = qh(x[16:]), qt(x[16:])
        assert float((zh - model(x[16:])).abs().max()) > 1e-3  # quantized
    assert torch.allclose(zh, zt, atol=1e-3 * float(zt.abs().max()))
    assert torch.equal(zh.argmax(1), zt.argmax(1))


def test_hf_quantized_modules_are_built_from_hf_modules(hf_dirs):
    from vitq.models.hf import QHFAttention, QHFLayer

    model, _ = build("hf_vit", hf_dirs)
    layer = model.hf.vit.layers[0]
    q = prepare(model, Scheme("matmul"))
    qlayer = q.hf.vit.layers[0]
    assert isinstance(qlayer, QHFLayer) and isinstance(qlayer.attention, QHFAttention)
    assert torch.equal(qlayer.attention.q_proj.weight, layer.attention.q_proj.weight)
    assert qlayer.attention.num_heads == 2


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(*argv):
    from vitq.cli import main

    return main([*argv, "--quiet", "--num-workers", "0", "--batch-size", "4"])


@pytest.mark.parametrize("fam", ["resnet", "effnet", "levit", "hf_vit"])
def test_cli_quantize_evaluate_reload(request, tmp_path, fam):
    folder = make_image_folder(tmp_path / "img", per_class=2, size=40)
    if fam == "hf_vit":
        model_flags = ["--model", f"hf:{request.getfixturevalue('hf_dirs')['hf_vit']}"]
    else:
        from safetensors.torch import save_file

        name, kw, _ = TINY_TIMM[fam]
        model, _ = build(fam)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
        model_flags = ["--model", name, "--model-args", json.dumps(kw), "--weights", str(tmp_path / "w.safetensors")]
    out = tmp_path / "out"
    assert _cli("quantize", *model_flags, "--calib", str(folder), "--val", str(folder), "--method", "minmax",
                "--w-bits", "8", "--a-bits", "8", "--out", str(out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quant"]["agreement"] >= 0 and (out / "quant_state.safetensors").exists()
    ev = tmp_path / "eval.json"
    assert _cli("evaluate", *model_flags, "--state", str(out), "--val", str(folder), "--out", str(ev)) == 0
    again = json.loads(ev.read_text())
    assert again["quant"] == res["quant"]  # the reloaded state gives the same predictions


def test_cli_models_lists_families(capsys):
    from vitq.cli import main

    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in FAMILIES:
        assert name in text
    assert "BatchNorm" in text and "hf:DIR" in text
