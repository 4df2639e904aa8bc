"""LayerScale ViTs (DeiT-III, DINOv2 with registers, CaiT) under fq: the class and register tokens keep their own
ranges in the residual stream and the final LayerNorm input, so fq W8A8 stays as close to float as matmul W8A8.

With one range per residual stream, the class token of a LayerScale model (timm's init: 1e-6 against patch
tokens of order 1) was rounded to 0 and the logits were exactly 0; with a trained-like init (tokens of std 0.02,
LayerScale 0.1) the tiny models below reached logit cosine 0.954 (DeiT-III) and 0.975 (DINOv2-reg).
"""

import pytest
import torch
import torch.nn.functional as F
from zoo import tiny_images, tiny_model

import vitq
from vitq.quant.base import quantizers_of
from vitq.quant.modules import PrefixSplit, split_prefix
from vitq.quant.uniform import PTFQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERSCALE = ("deit3", "dinov2_reg", "cait")


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Class/register tokens of std 0.02 and LayerScale factors in [0.1, 0.15], as trained models have them
    (timm initializes the tokens at 1e-6 and LayerScale at 1e-6 or 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.split(".")[-1] in ("gamma_1", "gamma_2"):
                p.copy_(0.1 * (1 + 0.5 * torch.rand(p.shape, generator=g)))
            if name in ("cls_token", "reg_token", "dist_token"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def w8a8_cosine(model, key: str, regime: str) -> float:
    x = tiny_images(key, 16, seed=1)
    qmodel, _ = vitq.quantize(model, x[:8], regime, "minmax", batch_size=8, progress=False, w_bits=8, a_bits=8)
    with torch.no_grad():
        return cosine(qmodel(x), model(x))


@pytest.mark.parametrize("key", LAYERSCALE)
@pytest.mark.parametrize("init", ["trained_like", "timm"])
def test_fq_w8a8_is_as_close_as_matmul_on_layerscale_models(key, init):
    model = tiny_model(key)
    if init == "trained_like":
        trained_like(model)
    fq, matmul = w8a8_cosine(model, key, "fq"), w8a8_cosine(model, key, "matmul")
    assert matmul > 0.999
    assert fq > 0.999, f"fq W8A8 logit cosine {fq:.4f} (matmul {matmul:.4f})"


@pytest.mark.parametrize("key", LAYERSCALE[:2])
def test_prefix_tokens_get_their_own_residual_and_norm_ranges(key):
    model = tiny_model(key)
    qmodel = vitq.prepare(model, vitq.Scheme("fq"))
    n = model.num_prefix_tokens
    splits = {name: m for name, m in qmodel.named_modules() if isinstance(m, PrefixSplit)}
    assert set(splits) == {f"blocks.{i}.res_quant{j}" for i in range(2) for j in (1, 2)} | {"norm.input_quant"}
    assert all(s.num_prefix == n and isinstance(s.prefix_quant, PTFQuantizer) for s in splits.values())
    # matmul quantizes no residual stream: nothing to split
    assert not any(isinstance(m, PrefixSplit) for m in vitq.prepare(model, vitq.Scheme("matmul")).modules())


def test_prefix_split_quantizes_the_prefix_with_its_own_range():
    tokens = torch.cat([1e-3 * torch.randn(4, 2, 8), 3 * torch.randn(4, 10, 8)], dim=1)
    split = split_prefix(PTFQuantizer(8, "residual", num_channels=8), 2)
    for q, part in ((split.prefix_quant, tokens[:, :2]), (split.token_quant, tokens[:, 2:])):
        q.set_range(part.min(), part.max())
    out = split(tokens)
    assert torch.equal(out[:, 2:], split.token_quant(tokens[:, 2:]))
    assert (out[:, :2] - tokens[:, :2]).abs().max() < 1e-5  # one shared range (step ~0.1) would round it to 0
    assert split_prefix(split.token_quant, 0) is split.token_quant


@pytest.mark.parametrize("key", LAYERSCALE)
def test_layerscale_fq_save_load_and_onnx_parity(tmp_path, key):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = trained_like(tiny_model(key))
    x = tiny_images(key, 8, seed=1)
    qmodel, _ = vitq.quantize(model, x, "fq", "minmax", batch_size=8, progress=False, w_bits=8, a_bits=8)
    assert all(bool(q.initialized) for q in quantizers_of(qmodel).values())
    with torch.no_grad():
        out = qmodel(x)
        (tmp_path / "state").mkdir()
        vitq.save(qmodel, tmp_path / "state")
        again = vitq.load(model, tmp_path / "state")
        assert torch.equal(again(x), out)
    vitq.export(again, tmp_path / "m.onnx", float_model=model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = torch.from_numpy(ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
                           .run(None, {"input": x.numpy()})[0])
    assert cosine(got, out) > 0.999 and (got - out).abs().max() <= 0.05 * out.abs().max()


def test_cait_units_run_the_model_and_class_token_has_its_own_range():
    from vitq.models.cait import CaitClassStage, QClassAttnBlock, QLayerScaleBlock, QTalkingHeadAttn
    from vitq.models.trunk import Trunk

    model = trained_like(tiny_model("cait"))
    x = tiny_images("cait", 4, seed=1)
    qmodel = vitq.prepare(model, vitq.Scheme("fq"))
    vitq.calibrate(qmodel, x, method="minmax", progress=False)
    assert isinstance(qmodel.blocks[0], QLayerScaleBlock) and isinstance(qmodel.blocks[0].attn, QTalkingHeadAttn)
    assert isinstance(qmodel.blocks_token_only[0], QClassAttnBlock)
    assert isinstance(qmodel.blocks_token_only[0].res_quant1, PrefixSplit)  # [class token, patch tokens]
    trunk = Trunk(qmodel)
    assert [n for n, _ in trunk.units] == ["blocks.0", "blocks.1", "blocks_token_only.0"]
    assert isinstance(trunk.units[-1][1], CaitClassStage) and len(trunk.blocks()) == 3
    with torch.no_grad():
        assert torch.equal(trunk.forward_from(0, trunk.stem(x)), qmodel(x))
        assert torch.equal(trunk.forward_from(2, trunk.input_of(2, x)), qmodel(x))
