"""Grid files: a YAML mapping whose keys take one value or a list; every combination of the lists is a job.

    models: [{name: deit_tiny_patch16_224, weights: path/to/deit_tiny.safetensors}]
    calib: path/to/calib          # image folders (relative paths: from the grid file's folder)
    val: path/to/val
    scheme: [matmul, fq]
    bits: ["8/8", "4/4"]          # weights/activations
    method: [minmax, omse]        # or recipe: [best]
    num_calib: 32
    seed: [0, 1]

A model is a timm name, ``hf:DIR``, a weights file (``.safetensors`` / ``.pth``, named after its timm model) or a
mapping ``{name, weights, model_args}``. ``grids: [{...}, {...}]`` lists sub-grids that each take the top-level
keys as defaults and expand on their own (settings that are not a full product). A mapping-valued key
(``options``, ``refine_options``, ``synthetic``) is one value; give a list of mappings for several. Keys that do
not change the numbers (``label``, ``resources``, ``save_state``, ``eval_shards``, ``synthetic_dir``) are kept out
of the job key. Synthetic calibration images (``calib: synthetic:N``, ``augment_synthetic``, ``synthetic``):
:mod:`vitq.sweep.synthetic`.
``eval_steps: true`` also evaluates the model after the base calibration (and rounding) and after each refiner
but the last of the chain, one run giving every stage of a leaderboard (base, + recon, + recon + evolq); the job's
own metrics stay those of the whole chain.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field

from vitq.errors import VitqError

# key -> default; every key a job's numbers depend on (the job key hashes them all)
CONFIG_KEYS: dict[str, object] = {
    "model": None, "calib": None, "val": None, "num_calib": None, "num_val": None, "labels": "wnid",
    "class_map": None, "scheme": "fq", "bits": "8/8", "attn_bits": None, "softmax_quantizer": None,
    "gelu_quantizer": None, "attn_granularity": None, "method": None, "recipe": None, "options": None,
    "rounding": None, "refine": None, "refine_options": None, "seed": 0, "batch_size": 50, "device": "cpu",
    "eval_steps": False, "augment_synthetic": None, "synthetic": None,
}
# keys that describe how a job runs or is shown, not what it computes
RUN_KEYS: dict[str, object] = {"label": None, "resources": None, "save_state": False, "eval_shards": 1,
                               "synthetic_dir": None}
ALIASES = {"models": "model", "seeds": "seed", "methods": "method", "schemes": "scheme", "recipes": "recipe"}
SCHEME_EXTRAS = ("attn_bits", "softmax_quantizer", "gelu_quantizer", "attn_granularity")
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


@dataclass
class Job:
    """One combination: ``config`` (what the numbers depend on, resolved), ``run`` (label, resources, ...),
    ``key`` (hash of the config, the calibration files, the weights and the code version)."""

    config: dict
    run: dict = field(default_factory=dict)
    key: str = ""
    calib_files: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.run.get("label") or describe(self.config)


def describe(config: dict) -> str:
    """A short name of a job's setting (its seed aside): ``fq W4A8 repq+gptq``, with its synthetic images
    ``(synthetic:32 psaq)`` / ``(+32 fdda)``."""
    what = config["method"] + ("+gptq" if config.get("rounding") == "gptq" else "")
    if config.get("refine"):
        what += "+" + config["refine"]
    synth = config.get("synthetic")
    if synth:
        source = f"+{config['augment_synthetic']}" if config.get("augment_synthetic") else config["calib"]
        what += f" ({source} {synth['generator']})"
    return f"{config['scheme']} W{config['w_bits']}A{config['a_bits']} {what}"


def read_grid(path: str) -> dict:
    """The grid file as a mapping (YAML, or JSON which YAML reads too)."""
    try:
        import yaml
    except ImportError:
        raise VitqError("reading a grid file needs PyYAML: pip install 'vitq[sweep]'") from None
    if not os.path.isfile(path):
        raise VitqError(f"grid file {path} does not exist (expected a YAML file; see vitq sweep --help)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise VitqError(f"grid file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise VitqError(f"grid file {path} must be a mapping of keys (models, calib, val, scheme, bits, ...)")
    return data


def expand(grid: dict, base_dir: str = ".", overrides: dict | None = None) -> list[Job]:
    """Every combination of the grid's list-valued keys (per sub-grid), as jobs with resolved configs (no key
    yet: :func:`assign_keys`). Duplicates (the same config twice) are kept once. ``overrides``: keys set for every
    job, over the grid's and its sub-grids' own (``vitq sweep --set``; e.g. the resources of another machine)."""
    grid = {ALIASES.get(k, k): v for k, v in grid.items()}
    overrides = {ALIASES.get(k, k): v for k, v in (overrides or {}).items()}
    subs = grid.pop("grids", None)
    if subs is None:
        subs = [{}]
    if not isinstance(subs, list) or not all(isinstance(s, dict) for s in subs) or not subs:
        raise VitqError("grid key 'grids' must be a non-empty list of mappings (sub-grids)")
    jobs, seen = [], set()
    for sub in subs:
        merged = {**grid, **{ALIASES.get(k, k): v for k, v in sub.items()}, **overrides}
        unknown = sorted(set(merged) - set(CONFIG_KEYS) - set(RUN_KEYS))
        if unknown:
            raise VitqError(f"grid key(s) {unknown} unknown (expected some of {sorted({*CONFIG_KEYS, *RUN_KEYS})})")
        names = [k for k in (*CONFIG_KEYS, *RUN_KEYS) if k in merged]
        values = [v if isinstance(v, list) else [v] for v in (merged[k] for k in names)]
        for k, v in zip(names, values):
            if not v:
                raise VitqError(f"grid key {k!r} is an empty list (expected at least one value)")
        for combo in itertools.product(*values):
            given = dict(zip(names, combo))
            job = resolve(given, base_dir)
            sig = json.dumps(job.config, sort_keys=True)
            if sig not in seen:
                seen.add(sig)
                jobs.append(job)
    return jobs


def expand_vars(text: str) -> str:
    """``$NAME`` / ``${NAME}`` from the environment, and ``${NAME:-default}`` (the default when NAME is unset)."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), text)
    return os.path.expandvars(text)


def _path(value, base_dir: str, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise VitqError(f"grid key {what!r}: {value!r} is not a path")
    value = os.path.expanduser(expand_vars(value))
    return os.path.abspath(value if os.path.isabs(value) else os.path.join(base_dir, value))


def model_spec(value, base_dir: str) -> dict:
    """``{name, weights, model_args}`` of a model entry (a string or a mapping)."""
    if isinstance(value, str):
        stem, ext = os.path.splitext(os.path.basename(value))
        if ext in WEIGHT_EXTENSIONS:
            value = {"name": stem, "weights": value}
        else:
            value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise VitqError(f"grid key 'models': {value!r} is not a model (expected a timm name, hf:DIR, a weights "
                        "file, or {name: ..., weights: ..., model_args: {...}})")
    stray = sorted(set(value) - {"name", "weights", "model_args"})
    if stray:
        raise VitqError(f"grid model {value['name']}: unknown field(s) {stray} (expected name, weights, model_args)")
    name = value["name"]
    if name.startswith("hf:"):
        name = "hf:" + _path(name[3:], base_dir, "models")
    args = value.get("model_args") or {}
    if not isinstance(args, dict):
        raise VitqError(f"grid model {name}: model_args must be a mapping of timm.create_model keywords")
    return {"name": name, "weights": _path(value.get("weights"), base_dir, "weights"), "model_args": args}


def parse_bits(value) -> tuple[int, int]:
    text = str(value)
    try:
        w, a = (int(v) for v in text.split("/"))
    except ValueError:
        raise VitqError(f"grid key 'bits': {value!r} is not W/A (expected e.g. \"4/8\": weight/activation "
                        "bits, quoted in YAML)") from None
    return w, a


def resolve(given: dict, base_dir: str) -> Job:
    """One combination with defaults filled, paths made absolute and a recipe turned into the settings it
    stands for (as ``vitq quantize --recipe`` fills the flags left unset)."""
    from vitq.calib import synthetic_count
    from vitq.recipes import choose
    from vitq.registry import get_method, get_refiner
    from vitq.scheme import A_BITS, W_BITS
    from vitq.sweep.synthetic import resolve_synthetic

    cfg = {k: given.get(k, d) for k, d in CONFIG_KEYS.items()}
    run = {k: given.get(k, d) for k, d in RUN_KEYS.items()}
    if cfg["model"] is None or cfg["calib"] is None:
        raise VitqError("a grid needs 'models' and 'calib' (and 'val' to evaluate)")
    cfg["model"] = model_spec(cfg["model"], base_dir)
    for k in ("calib", "val", "class_map"):
        if k != "calib" or synthetic_count(cfg[k]) is None:
            cfg[k] = _path(cfg[k], base_dir, k)
    run["synthetic_dir"] = _path(run["synthetic_dir"], base_dir, "synthetic_dir")
    resolve_synthetic(cfg)
    w, a = parse_bits(cfg.pop("bits"))
    if w not in W_BITS or a not in A_BITS:
        raise VitqError(f"grid key 'bits': {w}/{a} is not supported (weights {W_BITS.start}..{W_BITS.stop - 1}, "
                        f"activations {A_BITS.start}..{A_BITS.stop - 1})")
    cfg["w_bits"], cfg["a_bits"] = w, a
    if cfg["scheme"] not in ("fq", "matmul"):
        raise VitqError(f"grid key 'scheme': {cfg['scheme']!r} (expected fq or matmul)")
    cfg["options"] = dict(cfg["options"] or {})
    ref_opts = {k: dict(v or {}) for k, v in (cfg["refine_options"] or {}).items()}
    if isinstance(cfg["refine"], list):
        cfg["refine"] = ",".join(cfg["refine"])
    if cfg["recipe"] is not None:
        recipe, why = choose(cfg["recipe"], cfg["scheme"], w, a)
        plan = recipe.plan(cfg["device"])
        cfg["method"] = cfg["method"] or plan["method"]
        cfg["rounding"] = cfg["rounding"] or plan["rounding"]
        if cfg["refine"] is None and plan["refine"]:
            cfg["refine"] = ",".join(plan["refine"])
        cfg["options"] = {**plan["options"], **cfg["options"]}
        for name, opts in plan["refine_options"].items():
            ref_opts[name] = {**opts, **ref_opts.get(name, {})}
        for k, v in plan["scheme"].items():
            cfg[k] = v if cfg.get(k) is None else cfg[k]
        if cfg["num_calib"] is None:
            cfg["num_calib"] = plan["num_calib"]
        cfg["recipe"] = {"asked": cfg["recipe"], "name": recipe.name, "why": why}
    if cfg["method"] is None:
        raise VitqError("every grid job needs a 'method' (or a 'recipe')")
    cfg["rounding"] = cfg["rounding"] or "nearest"
    entry = get_method(cfg["method"])
    entry.check_options(cfg["options"])
    chain = cfg["refine"].split(",") if cfg["refine"] else []
    for name in chain:
        r = get_refiner(name)
        r.check_options(ref_opts.get(name, {}))
        if ref_opts.get(name, {}).get("select_on_val"):
            raise VitqError(f"grid: {name} select_on_val chooses on evaluation labels; a sweep does not do that")
    stray = sorted(set(ref_opts) - set(chain))
    if stray:
        raise VitqError(f"grid refine_options for {stray}, which are not in the refiner chain {chain}")
    cfg["refine_options"] = ref_opts
    if not isinstance(cfg["eval_steps"], bool):
        raise VitqError(f"grid key 'eval_steps': {cfg['eval_steps']!r} (expected true or false)")
    for k in ("num_calib", "num_val", "batch_size", "seed"):
        if cfg[k] is not None and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or
                                   (cfg[k] < 0 if k == "seed" else cfg[k] <= 0)):
            raise VitqError(f"grid key {k!r}: {cfg[k]!r} (expected a positive integer)")
    res = run["resources"] or {}
    if not isinstance(res, dict) or set(res) - set(RESOURCE_KEYS):
        raise VitqError(f"grid key 'resources': {res!r} (expected a mapping of {', '.join(RESOURCE_KEYS)})")
    return Job(cfg, run)


def code_version() -> str:
    """vitq's version and a hash of its source files: any change of the code gives new job keys."""
    from vitq._version import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return f"{__version__}+{h.hexdigest()[:12]}"


def calib_files(cfg: dict) -> list[str]:
    """The calibration images a job draws (as ``vitq quantize`` draws them; none for synthetic:N)."""
    from vitq.calib import synthetic_count
    from vitq.data import scan_image_folder, select_records

    if synthetic_count(cfg["calib"]) is not None:
        return []

    records = scan_image_folder(cfg["calib"], labels="folder", flag="calib")
    return [r.path for r in select_records(records, cfg["num_calib"], cfg["seed"], flag="num_calib")]


def assign_keys(jobs: list[Job], code: str | None = None) -> list[Job]:
    """Each job's key: sha256 of its config, its calibration file list (paths and sizes), the weights file's
    sha256 and the code version."""
    from vitq.models.loading import sha256_file

    code = code or code_version()
    shas: dict = {}
    draws: dict = {}
    for job in jobs:
        weights = job.config["model"]["weights"]
        if weights and weights not in shas:
            if not os.path.isfile(weights):
                raise VitqError(f"grid model {job.config['model']['name']}: weights {weights} is not a file")
            shas[weights] = sha256_file(weights)
        draw = (job.config["calib"], job.config["num_calib"], job.config["seed"])
        if draw not in draws:
            draws[draw] = [[p, os.path.getsize(p)] for p in calib_files(job.config)]
        job.calib_files = [p for p, _ in draws[draw]]
        blob = {"config": job.config, "calib_files": draws[draw], "weights_sha256": shas.get(weights),
                "code": code}
        job.key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]
    return jobs


def matches(job: Job, where: dict | None) -> bool:
    """Whether a job's config (or label) has, for each key of ``where``, one of its values (as text)."""
    for k, vals in (where or {}).items():
        have = job.label if k == "label" else job.config.get(k, job.run.get(k, "\0"))
        if isinstance(have, dict):
            have = have.get("name")
        if str(have) not in [str(v) for v in (vals if isinstance(vals, list | tuple) else [vals])]:
            return False
    return True


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as a mapping; VALUE is read as YAML (``num_gpus: 1`` style values, lists,
    mappings: ``resources={num_cpus: 4, num_gpus: 1}``)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitqError(f"--set {item!r}: expected KEY=VALUE (e.g. device=cuda or resources={{num_gpus: 1}})")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise VitqError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def load_jobs(path: str, code: str | None = None, where: dict | None = None,
              overrides: dict | None = None) -> list[Job]:
    """The keyed jobs of a grid file (those matching ``where``: {config key or label: value or values}), with
    ``overrides`` set on every job."""
    jobs = [j for j in expand(read_grid(path), os.path.dirname(os.path.abspath(path)), overrides)
            if matches(j, where)]
    if where and not jobs:
        raise VitqError(f"--only {where}: no job of {path} matches")
    return assign_keys(jobs, code)
