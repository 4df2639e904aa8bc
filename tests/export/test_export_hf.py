"""Hugging Face models (``--model hf:DIR``) end to end: prepare -> calibrate (minmax) -> save/load -> ONNX
export -> onnxruntime, for every HF class of tests/zoo.py under both schemes at W8A8. Exporting used to fail on
``projection.weight.dtype`` (transformers casts the image to the patch embedding's weight dtype)."""

import numpy as np
import pytest
import torch
from ort_helpers import cosine, run_ort
from zoo import HF_KEYS, tiny_images, tiny_model

import vitq
from vitq.export.onnx import export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# quantized-vs-float logit cosine at W8A8 minmax on 8 generated images, lowest of the images (measured with
# these tiny models: matmul >= 0.998, fq >= 0.978): bounds with a margin
FLOAT_COSINE = {"matmul": 0.99, "fq": 0.95}


@pytest.mark.parametrize("scheme", ["matmul", "fq"])
@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_model_end_to_end_with_export(tmp_path, key, scheme):
    m, x = tiny_model(key), tiny_images(key, 8)
    q = vitq.prepare(m, vitq.Scheme(scheme, 8, 8), method="minmax")
    vitq.calibrate(q, x, method="minmax", progress=False)
    vitq.save(q, tmp_path)
    q2 = vitq.load(m, tmp_path)
    with torch.no_grad():
        ref, fl = q(x).numpy(), m(x).numpy()
        assert np.array_equal(q2(x).numpy(), ref)
    assert cosine(ref, fl).min() > FLOAT_COSINE[scheme]
    info = export(q2, tmp_path / "m.onnx", float_model=m)
    assert not info["quantizers_identity"]
    scale = np.abs(ref).max()
    # the reference kernels: the same up to float round-off (a code flips now and then)
    out = run_ort(tmp_path / "m.onnx", x, optimize=False)
    assert cosine(out, ref).min() > 0.999 and np.abs(out - ref).max() <= 0.05 * scale
    # the fused integer kernels (QLinearSoftmax's exp table, integer requantization) move more codes
    out = run_ort(tmp_path / "m.onnx", x, optimize=True)
    assert cosine(out, ref).min() > 0.99
    assert run_ort(tmp_path / "m.onnx", x[:3], optimize=True).shape == (3, ref.shape[1])  # dynamic batch
