"""Real DeiT-Tiny from ../shared: W8A8 fq with OMSE keeps the float model's predictions (under a minute)."""

import json

import pytest
from conftest import SHARED

from vitq.cli import main

WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
DATA = SHARED / "data" / "imagenet-sample"

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not WEIGHTS.exists(), reason="../shared with the real DeiT-Tiny is not present")]


def test_deit_tiny_w8a8_fq_omse_agrees_with_float(tmp_path):
    out = tmp_path / "deit"
    assert main(["quantize", "--model", "deit_tiny_patch16_224", "--weights", str(WEIGHTS),
                 "--calib", str(DATA / "calib"), "--num-calib", "100", "--val", str(DATA / "val"), "--num-val", "100",
                 "--scheme", "fq", "--w-bits", "8", "--a-bits", "8", "--method", "omse", "--quiet",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["num_val"] == 100 and r["num_calib"] == 100
    assert r["float"]["top1"] > 70  # labels by WordNet id are right (a positional labelling gives ~0 %)
    assert r["quant"]["agreement"] >= 95.0
    assert r["quant"]["kl"] < 0.1
