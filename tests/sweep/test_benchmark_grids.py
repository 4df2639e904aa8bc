"""Every grid file of benchmarks/grids parses and expands to the jobs its BENCHMARKS.md section shows (no run):
the counts below are the tables' rows (recon: one job per configuration and draw, its three rows evaluated inside
the job), so a grid that loses or gains jobs is noticed."""

import os
from pathlib import Path

import pytest

from vitq.sweep.grid import expand, read_grid

pytest.importorskip("yaml")
GRIDS = Path(__file__).resolve().parents[2] / "benchmarks" / "grids"
# grid -> (jobs, settings without the seed, labels)
EXPECTED = {
    "lowbit": (96, 34, 17),         # 5 settings x 3 configs x 3 draws; references: ptq4vit x 3 (1 draw), fqvit x 2;
                                    # W4A4 x 3 draws: repq with percentile ranges / a half fold / quantile ranges /
                                    # all RepQ-ViT's ranges / head balance, repq-adalog alone / per-head q/k/v /
                                    # head balance / shifted GELU / output search; sequential order: repq W4A4,
                                    # repq-adalog W4A4 and W3A3 (and repq-adalog alone at W3A3), x 3 draws
    "recon_levers": (22, 16, 16),   # recon, recon + all levers, recon at 500 steps x 3 draws; 10 single levers;
                                    # output search alone and + recon, ridge with the class token weighted (seed 0)
    "recon": (23, 11, 5),           # 11 configurations: 4 with 3 draws, 7 with one
    "baselines": (32, 32, 32),      # 2 schemes x 4 bit widths x 4 methods
    "ptqvit_baselines": (40, 40, 9),  # 6 settings x 6 methods + 4 aciq ablations
    "apq": (18, 18, 6),             # 3 bit widths x 6 configs
    "cnn": (17, 15, 15),            # 10 minmax/omse, omse + evolq x 3 draws, 4 W4A8 chains
    "ptqvit": (34, 34, 34),         # one row per label: bit widths, MP, ablations
    "evolq": (8, 4, 2),             # fqvit + evolq checked at W4A8 and W3A8 x 3 seeds, faithful x seed 0 (the
                                    # base: eval_steps)
    "synth": (120, 40, 3),          # (deit: real, synthetic; effnet: real, synthetic, real+fdda) x N 32, 250 x
                                    # 4 bit widths x 3 draws; labels: the sources
}


def test_every_grid_file_is_known():
    assert sorted(p.stem for p in GRIDS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_benchmark_grid_expands_to_its_jobs(name, monkeypatch):
    monkeypatch.setenv("VITQ_SHARED", "/nonexistent/shared")  # paths are resolved, not read
    path = GRIDS / f"{name}.yaml"
    jobs = expand(read_grid(str(path)), str(path.parent))
    settings = {(j.label, *(str(v) for k, v in sorted(j.config.items()) if k != "seed")) for j in jobs}
    assert (len(jobs), len(settings), len({j.label for j in jobs})) == EXPECTED[name]
    for j in jobs:
        assert j.config["calib"].startswith("/nonexistent/shared/data/imagenet-sample/") or (
            j.config["calib"] == f"synthetic:{j.config['num_calib']}" and j.config["synthetic"]["options"])
        assert j.config["model"]["weights"].startswith("/nonexistent/shared/models/")
        assert os.path.basename(j.config["model"]["weights"]) == j.config["model"]["name"] + ".safetensors"
        assert j.config["val"].endswith("/val") and j.config["num_val"] is None  # all of val/
    if name == "recon":  # a job gives the three rows of its configuration
        assert all(j.config["refine"] == "recon,evolq" and j.config["eval_steps"] for j in jobs)
    if name == "synth":  # each source has its generator; FDDA adds as many images as the real draw has
        gens = {(j.config["model"]["name"], j.label, (j.config.get("synthetic") or {}).get("generator"),
                 j.config.get("augment_synthetic") == j.config["num_calib"]) for j in jobs}
        assert gens == {("deit_tiny_patch16_224", "real", None, False), ("deit_tiny_patch16_224", "synthetic", "psaq",
                         False), ("tf_efficientnet_lite0", "real", None, False), ("tf_efficientnet_lite0", "synthetic",
                         "bn", False), ("tf_efficientnet_lite0", "real+fdda", "fdda", True)}
