"""Recipes (--recipe, vitq recipes) and refiner chains from the command line, on a tiny model."""

import json

import pytest
import torch
from conftest import TINY, make_image_folder, tiny_model
from safetensors.torch import save_file

from vitq import recipes
from vitq.cli import build_parser, main
from vitq.cli.quantize import apply_recipe
from vitq.errors import VitqError

NAME, KW = TINY["deit"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv):
    return build_parser().parse_args(["quantize", "--model", NAME, "--calib", "c", "--out", "o", *argv])


def test_recipe_expands_to_the_documented_flags():
    r = recipes.by_name("fq-fqvit-recon-evolq")
    assert r.as_flags("cpu") == ["--method", "fqvit", "--refine", "recon,evolq", "--recon-iters", "500",
                                 "--recon-batch-size", "4", "--recon-lr", "0.01", "--recon-scale-lr", "0.004",
                                 "--evolq-passes", "1"]
    assert r.as_flags("cuda") == ["--method", "fqvit", "--refine", "recon,evolq"]
    # no recipe drops calibration images the user gave (issue 26: 50 of 250 overfitted reconstruction)
    assert all(r.plan(device)["num_calib"] is None for r in recipes.RECIPES for device in ("cpu", "cuda"))
    # every flag of every usable recipe parses, and parsing it gives the recipe's settings
    for r in recipes.RECIPES:
        if recipes.unavailable(r) is None:
            args = _args(*r.as_flags("cpu"))
            assert {d: getattr(args, d) for d in r.settings("cpu")} == r.settings("cpu")


def test_apply_fills_only_unset_flags():
    args = _args("--recipe", "best", "--scheme", "matmul", "--w-bits", "4", "--a-bits", "4")
    info = apply_recipe(args)
    assert info["name"].startswith("matmul-") and args.method == info["applied"]["method"]
    assert info["overridden_by_flags"] == {} and info["applied"] == recipes.by_name(info["name"]).settings("cpu")
    args = _args("--recipe", "matmul-repq-adalog-recon", "--scheme", "matmul", "--recon-iters", "5")
    info = apply_recipe(args)
    assert args.recon_iters == 5 and info["overridden_by_flags"] == {"recon_iters": 5}
    assert args.gelu_quantizer == "adalog" and args.softmax_quantizer == "adalog"  # CLI default unset
    args = _args("--recipe", "fq-fqvit-recon", "--refine", "evolq", "--method", "omse")
    info = apply_recipe(args)
    assert args.refine == "evolq" and args.method == "omse" and args.recon_iters == 500
    assert set(info["overridden_by_flags"]) == {"refine", "method"}


def test_best_uses_the_measurements_and_skips_unusable_recipes(monkeypatch):
    missing = recipes.Recipe("x", "fq", "no-such-method")
    assert recipes.unavailable(missing) == "method 'no-such-method' is not registered"
    no_flag = recipes.Recipe("y", "fq", "fqvit", flags={"weight_rounding": "gptq"})
    assert "--weight-rounding" in recipes.unavailable(no_flag, dests={"method"})
    monkeypatch.setattr(recipes, "RECIPES", (
        recipes.Recipe("missing", "fq", "no-such-method"),
        recipes.Recipe("a", "fq", "fqvit"),
        recipes.Recipe("b", "fq", "fqvit", ("recon",)),
        recipes.Recipe("c", "matmul", "omse"),
    ))
    monkeypatch.setattr(recipes, "MEASURED", {
        ("missing", 4, 8): {"agreement": 99.0}, ("a", 4, 8): {"agreement": 80.0}, ("b", 4, 8): {"agreement": 90.0},
        ("a", 8, 8): {"agreement": 97.0}, ("b", 8, 8): {"agreement": 96.5}})
    assert recipes.choose("best", "fq", 4, 8)[0].name == "b"
    assert recipes.choose("best", "fq", 8, 8)[0].name == "a"
    recipe, why = recipes.choose("best", "fq", 3, 8)
    assert recipe.name == "a" and "nothing measured" in why
    with pytest.raises(VitqError, match="cannot run here"):
        recipes.choose("missing", "fq", 4, 8)
    with pytest.raises(VitqError, match="matmul regime"):
        recipes.choose("c", "fq", 4, 8)
    with pytest.raises(VitqError, match="--recipe 'nope' is unknown"):
        recipes.choose("nope", "fq", 4, 8)


def test_recipes_command_prints_the_table(capsys):
    assert main(["recipes", "--scheme", "fq", "--w-bits", "4", "--a-bits", "8"]) == 0
    out = capsys.readouterr().out
    for r in recipes.RECIPES:
        assert r.name in out
    assert "skipped" not in out.split("fq-repq-recon", 1)[1].split("\n\n", 1)[0]  # repq is here
    assert "--recipe best for fq W4A8:" in out
    n_measured = sum(1 for k in recipes.MEASURED)
    assert out.count("unmeasured") + n_measured >= len(recipes.RECIPES)


def test_quantize_with_a_recipe_runs_and_records_the_chain(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("deit").state_dict().items()}, str(weights))
    calib = make_image_folder(tmp_path / "calib", per_class=2, seed=1)
    val = make_image_folder(tmp_path / "val", per_class=2, seed=2)
    out = tmp_path / "out"
    argv = ["quantize", "--model", NAME, "--model-args", json.dumps(KW), "--weights", str(weights), "--calib",
            str(calib), "--val", str(val), "--scheme", "fq", "--w-bits", "4", "--a-bits", "8", "--recipe",
            "fq-fqvit-recon-evolq", "--recon-iters", "4", "--recon-batch-size", "2", "--evolq-passes", "1",
                "--evolq-mode", "faithful",  # 6 calibration images are too few for the default check split
            "--batch-size", "3", "--num-workers", "0", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "fqvit" and r["refine"] == "recon,evolq" and r["recipe"]["name"] == "fq-fqvit-recon-evolq"
    chain = r["refinement"]["chain"]
    assert [s["refiner"] for s in chain] == ["recon", "evolq"]
    assert chain[0]["options"]["iters"] == 4 and chain[0]["options"]["batch"] == 2
    assert all(s["seconds"] > 0 and "gain" in s["calib_kl"] for s in chain)
    assert not list(tmp_path.glob(".out.*-ckpt"))  # both checkpoints removed after success


def test_recipes_run_from_python_as_from_the_command_line():
    """A recipe is data: vitq.quantize(recipe=...) applies the same method, kinds, refiners and options as
    --recipe, and an explicit argument wins over it."""
    import vitq

    r = recipes.by_name("matmul-repq-adalog-recon")
    plan = r.plan("cpu")
    assert plan["method"] == "repq" and plan["refine"] == ["recon"] and plan["scheme"]["gelu_quantizer"] == "adalog"
    assert plan["refine_options"]["recon"]["iters"] == r.settings("cpu")["recon_iters"]
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    q, record = vitq.quantize(tiny_model("deit"), x, "matmul", recipe=r.name, progress=False,
                              refine_options={"recon": {"iters": 2}})
    assert record["recipe"]["name"] == r.name and q.vitq_scheme.softmax_quantizer == "adalog"
    assert record["refinement"]["refiner"] == "recon" and record["refinement"]["options"]["iters"] == 2
    assert record["num_calib"] == 6  # every image given
