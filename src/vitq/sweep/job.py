"""One job of a sweep, in whatever process runs it (a Ray worker, or this one): the same steps, in the same
order and on the same images, as ``vitq quantize`` with the job's settings, so a job's metrics equal the
standalone command's. Nothing here imports Ray.

The data a job needs is made once per grid and passed in (through Ray's object store in a sweep):
:func:`calib_data` (a model's calibration draw) and :func:`eval_data` (the evaluation images, their labels, the
batches they came in and the float model's logits of each batch, the per-model cache). Float models are built
once per worker process and shared by its jobs (no step of a job changes the float model).
"""

from __future__ import annotations

import os
import platform
import socket
import time
import traceback
import warnings

import numpy as np
import torch

from vitq.errors import VitqError

_MODELS: dict = {}


def model_key(spec: dict) -> str:
    import json

    return json.dumps(spec, sort_keys=True)


def float_model(spec: dict) -> torch.nn.Module:
    """The float model of a grid's model entry, built once per process (as ``vitq quantize`` builds it)."""
    from vitq.models.loading import create_model

    key = model_key(spec)
    if key not in _MODELS:
        _MODELS[key] = create_model(spec["name"], weights=spec["weights"], pretrained=spec["weights"] is None,
                                    **spec["model_args"]).eval()
    return _MODELS[key]


def _transform(spec: dict):
    from vitq.data import model_transform

    transform, desc = model_transform(float_model(spec))
    return transform, (int(desc["input_size"][1]), int(desc["input_size"][2])), desc


def _array(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only view of the object store: nothing here writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(a)


def calib_data(spec: dict, calib: str, num: int | None, seed: int, batch_size: int, threads: int = 1) -> dict:
    """A calibration draw preprocessed for the model: ``{"images", "files", "skipped"}``."""
    from vitq.data import read_images, scan_image_folder, select_records

    torch.set_num_threads(threads)
    transform, size, _ = _transform(spec)
    records = select_records(scan_image_folder(calib, labels="folder", flag="calib"), num, seed, flag="num_calib")
    images, _, loader = read_images(records, transform, batch_size, 0, size)
    if images is None:
        raise VitqError(f"calib {calib}: none of the {len(records)} calibration images could be read")
    return {"images": _array(images), "files": [r.path for r in records], "skipped": list(loader.skipped)}


def val_records(cfg: dict) -> list:
    from vitq.data import read_class_map, scan_image_folder, select_records

    class_map = read_class_map(cfg["class_map"]) if cfg.get("class_map") else None
    records = scan_image_folder(cfg["val"], labels=cfg["labels"], flag="val", class_map=class_map)
    return select_records(records, cfg["num_val"], cfg["seed"], flag="num_val")


@torch.no_grad()
def eval_data(spec: dict, cfg: dict, threads: int = 1, cache_dir: str | None = None, cache_key: str = "",
              keep_images: bool = True) -> dict:
    """The evaluation images of ``cfg`` for the model, batch by batch as ``vitq quantize`` reads them, with the
    float model's logits of every batch (read from ``cache_dir`` when an earlier sweep computed them)."""
    from vitq.data import make_loader
    from vitq.precision import full_float32

    torch.set_num_threads(threads)
    device = torch.device(cfg["device"])
    model = float_model(spec).to(device)  # the logits on the device the jobs evaluate on, as vitq quantize does
    transform, size, _ = _transform(spec)
    records = val_records(cfg)
    cache = os.path.join(cache_dir, f"float-{cache_key}.pt") if cache_dir and cache_key else None
    cached = torch.load(cache, weights_only=True) if cache and os.path.exists(cache) else None
    loader = make_loader(records, transform, batch_size=cfg["batch_size"], num_workers=0, min_size=size)
    xs, ys, zs, sizes = [], [], [], []
    t0 = time.perf_counter()
    with full_float32():
        for x, y in loader:
            xs.append(x)
            ys.append(y)
            sizes.append(len(y))
            if cached is None:
                zs.append(model(x.to(device)).float().cpu())
            else:
                zs.append(cached["logits"][sum(sizes[:-1]):sum(sizes)])
    if not xs:
        raise VitqError(f"val {cfg['val']}: none of the {len(records)} evaluation images could be read")
    logits = torch.cat(zs)
    if cache and cached is None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        torch.save({"logits": logits}, tmp)
        os.replace(tmp, cache)
    return {"images": _array(torch.cat(xs)) if keep_images else None, "labels": _array(torch.cat(ys)),
            "float_logits": _array(logits), "sizes": sizes, "skipped": list(loader.skipped),
            "records": [(r.path, r.label) for r in records], "float_s": time.perf_counter() - t0,
            "cached": cached is not None, "model": spec, "batch_size": cfg["batch_size"]}


def batches(data: dict, part=None):
    """(images, labels) of the batches of ``data`` (those in range ``part``), and their float logits."""
    sizes = data["sizes"]
    starts = np.cumsum([0, *sizes])
    part = range(len(sizes)) if part is None else part
    x = _tensor(data["images"]) if data["images"] is not None else None
    y, z = _tensor(data["labels"]), _tensor(data["float_logits"])
    items = [(slice(int(starts[k]), int(starts[k + 1]))) for k in part]
    return [(x[s], y[s]) for s in items] if x is not None else None, [z[s] for s in items]


def evaluate_job(qmodel, data: dict, part=None, device="cpu"):
    """The :class:`vitq.evaluate.Metrics` of ``qmodel`` on the batches ``part`` of ``data`` (all by default)."""
    from vitq.evaluate import evaluate_metrics

    xy, z = batches(data, part)
    if xy is None:  # images not kept (a large set): read this part's batches from disk
        from vitq.data import make_loader

        bs = data["batch_size"]
        part = range(len(data["sizes"])) if part is None else part
        recs = [_record(p, label) for p, label in data["records"][part.start * bs:part.stop * bs]]
        transform, size, _ = _transform(data["model"])
        xy = make_loader(recs, transform, batch_size=bs, num_workers=0, min_size=size)
    return evaluate_metrics(qmodel, None, xy, device=device, float_logits=z)


def _record(path, label):
    from vitq.data import ImageRecord

    return ImageRecord(path, label)


def machine() -> str:
    return f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} cpus, torch threads " \
           f"{torch.get_num_threads()}{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})"


def quantize_job(cfg: dict, calib: dict, state_dir: str | None = None, ckpt_prefix: str | None = None,
                 after_step=None):
    """Calibrate (round, refine) as ``vitq quantize`` does; returns (qmodel, record, seconds). ``after_step``:
    :func:`vitq.quantize`'s (called after the base and after each refiner)."""
    import vitq.api as api
    from vitq.calib import CalibData
    from vitq.registry import get_refiner
    from vitq.scheme import Scheme

    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitqError("device cuda was asked for but this worker has no CUDA device (declare num_gpus)")
    torch.manual_seed(cfg["seed"])
    model = float_model(cfg["model"])
    extras = {k: cfg[k] for k in ("attn_bits", "softmax_quantizer", "gelu_quantizer") if cfg.get(k) is not None}
    scheme = Scheme(cfg["scheme"], cfg["w_bits"], cfg["a_bits"], attn_granularity=cfg.get("attn_granularity") or
                    "tensor", **extras)
    refine_options = {n: dict(o) for n, o in cfg["refine_options"].items()}
    chain = cfg["refine"].split(",") if cfg["refine"] else []
    for name in chain:  # a resumable checkpoint for a refiner that keeps one, as the CLI does
        if "checkpoint_path" in get_refiner(name).config.field_names() and ckpt_prefix:
            refine_options.setdefault(name, {}).setdefault("checkpoint_path", f"{ckpt_prefix}.{name}-ckpt")
    images = _tensor(calib["images"]).clone()
    data = CalibData(images, batch_size=cfg["batch_size"], device=device, progress=False, seed=cfg["seed"])
    t0 = time.perf_counter()
    qmodel, record = api.quantize(model, data, scheme, cfg["method"], rounding=cfg["rounding"],
                                  refine=chain or None, options=cfg["options"],
                                  refine_options={n: o for n, o in refine_options.items() if o}, seed=cfg["seed"],
                                  progress=False, after_step=after_step)
    seconds = time.perf_counter() - t0
    if calib.get("source") is not None:  # synthetic images: where they came from, as vitq quantize records it
        record["calib_source"] = calib["source"]
    for opts in refine_options.values():
        path = opts.get("checkpoint_path")
        if path and os.path.exists(path):
            os.remove(path)
    if state_dir:
        from vitq.state import save

        os.makedirs(state_dir, exist_ok=True)
        save(qmodel.cpu(), state_dir, model=cfg["model"]["name"], model_args=cfg["model"]["model_args"],
             method=cfg["method"], refine=cfg["refine"])
        qmodel.to(device)
    return qmodel, record, seconds


def run_job(cfg: dict, calib: dict, evald: dict | None, threads: int = 1, state_dir: str | None = None,
            ckpt_prefix: str | None = None, shard_fn=None) -> dict:
    """One job end to end: the row of the results store (metrics, timings, machine), or ``{"error": line}``.
    ``shard_fn(qmodel, evald)``: evaluate elsewhere (sharded); by default here."""
    t_start = time.perf_counter()
    try:
        torch.set_num_threads(threads)

        def evaluate(qmodel):
            t0 = time.perf_counter()
            m = shard_fn(qmodel, evald) if shard_fn else evaluate_job(qmodel, evald, device=cfg["device"])
            metrics = m.result()
            if not cfg_labels_are_classes(cfg):
                for side in ("float", "quant"):
                    metrics[side]["top1"] = metrics[side]["top5"] = None
            return metrics, time.perf_counter() - t0

        stages: list = []
        chain = cfg["refine"].split(",") if cfg["refine"] else []

        def after_step(name, qmodel, info):  # every stage of the chain but the last (the job's own metrics)
            if name == (chain[-1] if chain else "base"):
                return
            metrics, seconds = evaluate(qmodel)
            stages.append(stage_record(name, metrics, seconds, info))

        steps_on = bool(cfg.get("eval_steps")) and evald is not None
        qmodel, record, quant_s = quantize_job(cfg, calib, state_dir, ckpt_prefix, after_step if steps_on else None)
        quant_s -= sum(s["eval_s"] for s in stages)
        metrics, eval_s = None, 0.0
        if evald is not None:
            metrics, eval_s = evaluate(qmodel)
        if steps_on:
            last = record["refinement"] if len(chain) < 2 else (record["refinement"] or {}).get("chain", [{}])[-1]
            stages.append(stage_record(chain[-1] if chain else "base", metrics, eval_s, last or record))
            record["stages"] = stages
        return {"metrics": metrics, "record": record, "quantize_s": quant_s, "eval_s": eval_s,
                "job_s": time.perf_counter() - t_start, "machine": machine(), "state_path": state_dir,
                "calib_skipped": calib["skipped"], "val_skipped": evald["skipped"] if evald else []}
    except Exception as e:  # noqa: BLE001  (a failed job is recorded, the others go on)
        return {"error": one_line(e), "trace": traceback.format_exc(limit=-3), "job_s": time.perf_counter() - t_start}


def stage_record(name: str, metrics: dict, eval_s: float, info: dict) -> dict:
    """What ``eval_steps`` keeps of one stage: after which step, its metrics, the step's seconds and calibration
    KL (a refiner's), and the evaluation's seconds."""
    if name == "base":
        seconds = info["calibration"].get("seconds", 0.0) + info["weight_rounding"].get("seconds", 0.0)
        calib_kl = None
    else:
        seconds, calib_kl = info.get("seconds"), info.get("calib_kl")
    return {"after": name, "quant": metrics["quant"], "float": metrics["float"], "num_images": metrics["num_images"],
            "step_s": seconds, "calib_kl": calib_kl, "eval_s": eval_s}


def cfg_labels_are_classes(cfg: dict) -> bool:
    """As ``vitq quantize``: top-1 only when the folder labels are the head's classes."""
    return cfg["labels"] == "wnid" or cfg.get("class_map") is not None


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"[:500]
