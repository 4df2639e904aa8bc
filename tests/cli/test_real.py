"""Real DeiT-Tiny from ../shared: W8A8 fq with OMSE keeps the float model's predictions (under a minute).

Deterministic: the calibration images are the seeded choice of 100 (seed 0), the evaluation is every image of
val/ (the benchmark's set, not a lucky subset), and torch runs on 2 threads, as in the benchmarks."""

import json

import pytest
import torch
from conftest import SHARED

from vitq.cli import main

WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
DATA = SHARED / "data" / "imagenet-sample"

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not WEIGHTS.exists(), reason="../shared with the real DeiT-Tiny is not present")]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_deit_tiny_w8a8_fq_omse_agrees_with_float(tmp_path, two_threads):
    out = tmp_path / "deit"
    assert main(["quantize", "--model", "deit_tiny_patch16_224", "--weights", str(WEIGHTS),
                 "--calib", str(DATA / "calib"), "--num-calib", "100", "--val", str(DATA / "val"),
                 "--scheme", "fq", "--w-bits", "8", "--a-bits", "8", "--method", "omse", "--quiet",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["num_val"] == 500 and r["num_calib"] == 100
    assert r["float"]["top1"] > 70  # labels by WordNet id are right (a positional labelling gives ~0 %)
    # measured with this exact command (after the issue-15 item-1 fix), twice, identical: agreement 93.40 %, KL 0.0249
    # (the benchmark's 250-image omse row is in BENCHMARKS.md); the margins are ~2 points (10 images) and ~40 %
    assert r["quant"]["agreement"] >= 91.5
    assert r["quant"]["kl"] <= 0.035
