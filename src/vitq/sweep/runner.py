"""Running a grid on Ray: the driver (this process) keys the jobs, skips those the store has finished, makes each
calibration draw (with its synthetic images: :mod:`vitq.sweep.synthetic`) and each evaluation set (with its float
logits) once as Ray tasks whose results stay in the object store, then runs the jobs as Ray tasks with their
declared resources, as many at a time as the cluster has room for, and writes each job's row into the store as it
comes back (the store's only writer).

A local Ray instance is started in-process unless ``address`` names a cluster (``auto``, ``ray://host:10001``
or ``host:6379``). A job that raises is recorded with its one-line error and the others go on; a sweep that is
killed leaves its running jobs in state ``running``, and the next run of the grid reruns them with every job
that did not finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from vitq.errors import VitqError
from vitq.sweep.cluster import start_ray
from vitq.sweep.grid import Job, code_version, load_jobs
from vitq.sweep.job import calib_data, eval_data, one_line, run_job
from vitq.sweep.store import Store, now, versions
from vitq.sweep.synthetic import calib_with_synthetic, uses_synthetic

log = logging.getLogger("vitq")
DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0, "memory": None}
SHARE_IMAGES_MB = 2048  # evaluation sets up to this size travel in the object store; larger ones are re-read


def _resources(job: Job, threads: int | None) -> dict:
    res = {**DEFAULT_RESOURCES, **(job.run.get("resources") or {})}
    if job.config["device"] == "cuda" and not res["num_gpus"]:
        res["num_gpus"] = 1
    res["threads"] = threads or max(1, int(res["num_cpus"]))
    return res


def _slots(ray, per_job: dict) -> int:
    total = ray.cluster_resources()
    n = int(total.get("CPU", 1) // max(per_job["num_cpus"], 1e-9)) if per_job["num_cpus"] else 10**6
    if per_job["num_gpus"]:
        n = min(n, int(total.get("GPU", 0) // per_job["num_gpus"]))
    if n < 1:
        raise VitqError(f"no job fits the Ray cluster ({total}): each asks for {per_job}; lower 'resources' in the "
                        "grid or add machines")
    return n


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _eval_key(cfg: dict, weights_sha: str | None, code: str) -> str:
    """What the float logits of an evaluation set depend on: the model, its weights, the images and batches."""
    model = {**cfg["model"], "weights_sha256": weights_sha}
    return _digest(model, cfg["val"], cfg["num_val"], cfg["seed"] if cfg["num_val"] else None, cfg["labels"],
                   cfg["class_map"], cfg["batch_size"], cfg["device"], code)


def sweep(grid: str, store: str, address: str | None = None, num_cpus: int | None = None,
          num_gpus: int | None = None, threads: int | None = None, progress: bool = True,
          max_jobs: int | None = None, shards: int | None = None, where: dict | None = None,
          overrides: dict | None = None) -> dict:
    """Run the grid file ``grid`` into the results store folder ``store``; returns a summary
    ``{"jobs", "skipped", "done", "failed", "ray_start_s", "seconds"}``.

    ``address``: an existing Ray cluster (default: start a local one with ``num_cpus`` / ``num_gpus``, all of
    this machine's by default). ``threads``: torch threads per job (default its ``num_cpus``). ``max_jobs``:
    stop after starting this many (for a partial run). ``shards``: evaluate each job's images in this many Ray
    tasks (default the grid's ``eval_shards``, 1). ``where``: run only the jobs whose config has these values
    (``{"method": ["repq"], "seed": [0]}``). ``overrides``: grid keys set on every job (``--set``), e.g.
    ``{"device": "cuda", "resources": {"num_cpus": 4, "num_gpus": 1}}`` for a GPU machine."""
    t_begin = time.perf_counter()
    code = code_version()
    jobs = load_jobs(grid, code, where, overrides)
    db = Store(store)
    try:
        return _run(jobs, db, grid, code, address, num_cpus, num_gpus, threads, progress, max_jobs, shards, t_begin)
    finally:
        db.close()


def _run(jobs, db, grid, code, address, num_cpus, num_gpus, threads, progress, max_jobs, shards, t_begin) -> dict:
    from tqdm.auto import tqdm

    from vitq.models.loading import sha256_file

    states = db.states()
    left = [j for j in jobs if states.get(j.key) != "done"]
    sweep_id = db.begin_sweep(os.path.abspath(grid), [j.key for j in jobs], address)
    summary = {"jobs": len(jobs), "skipped": len(jobs) - len(left), "done": 0, "failed": 0, "ray_start_s": 0.0}
    if max_jobs is not None:
        left = left[:max_jobs]
    if not left:
        db.update_sweep(sweep_id, finished=now())
        summary["seconds"] = time.perf_counter() - t_begin
        return summary
    ray, ray_s, _ = start_ray(address, num_cpus, num_gpus)
    summary["ray_start_s"] = ray_s
    per_job = _resources(left[0], threads)
    slots = _slots(ray, per_job)
    db.update_sweep(sweep_id, ray_start_s=ray_s, slots=slots)
    opts = {"num_cpus": per_job["num_cpus"], "num_gpus": per_job["num_gpus"]}
    if per_job["memory"]:
        opts["memory"] = int(per_job["memory"])
    prep = ray.remote(max_retries=0)(_prep).options(**opts)
    task = ray.remote(max_retries=0)(_job_task)
    shas: dict = {}
    calib_refs: dict = {}
    eval_refs: dict = {}
    cache_dir = os.path.join(db.dir, "cache")

    def refs_of(job: Job):
        cfg = job.config
        spec = cfg["model"]
        if spec["weights"] and spec["weights"] not in shas:
            shas[spec["weights"]] = sha256_file(spec["weights"])
        synth_dir = None
        if uses_synthetic(cfg):  # one set per model, draw and generator settings, for all the jobs using it
            synth_dir = job.run.get("synthetic_dir") or os.path.join(db.dir, "synthetic")
        ck = _digest(spec, cfg["calib"], cfg["num_calib"], cfg["seed"], cfg["batch_size"],
                     cfg.get("augment_synthetic"), cfg.get("synthetic"), synth_dir)
        if ck not in calib_refs:
            calib_refs[ck] = prep.remote("calib", spec, cfg, per_job["threads"], synth_dir)
        if cfg["val"] is None:
            return calib_refs[ck], None
        ek = _eval_key(cfg, shas.get(spec["weights"]), code)
        if ek not in eval_refs:
            eval_refs[ek] = prep.remote("eval", spec, cfg, per_job["threads"], cache_dir, ek)
        return calib_refs[ck], eval_refs[ek]

    vers = versions()
    pending: dict = {}
    queue = list(left)
    bar = tqdm(total=len(left), desc="sweep", disable=not progress, dynamic_ncols=True)
    try:
        while queue or pending:
            while queue and len(pending) < slots:
                job = queue.pop(0)
                res = _resources(job, threads)
                calib_ref, eval_ref = refs_of(job)
                state_dir = os.path.join(db.dir, "states", job.key) if job.run.get("save_state") else None
                n_shards = shards if shards is not None else int(job.run.get("eval_shards") or 1)
                o = {"num_cpus": res["num_cpus"], "num_gpus": res["num_gpus"]}
                if res["memory"]:
                    o["memory"] = int(res["memory"])
                ref = task.options(**o).remote(job.config, calib_ref, [eval_ref], res["threads"], state_dir,
                                               os.path.join(db.dir, "ckpt", job.key), n_shards, o)
                pending[ref] = (job, time.time())
                c = job.config
                db.put(job.key, state="running", label=job.label, model=c["model"]["name"], scheme=c["scheme"],
                       w_bits=c["w_bits"], a_bits=c["a_bits"], method=c["method"], rounding=c["rounding"],
                       refine=c["refine"], recipe=(c["recipe"] or {}).get("name"), num_calib=c["num_calib"],
                       seed=c["seed"], started=now(), finished=None, error=None, code_version=code,
                       config=c, calib_files=job.calib_files, sweep_id=sweep_id)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job, t0 = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (e.g. a prep task failed: the job is recorded as failed)
                    out = {"error": one_line(getattr(e, "cause", None) or e), "job_s": time.time() - t0}
                _record(db, job, out, vers)
                summary["failed" if "error" in out else "done"] += 1
                bar.update(1)
                bar.set_postfix(done=summary["done"], failed=summary["failed"])
    finally:
        bar.close()
    db.update_sweep(sweep_id, finished=now())
    summary["seconds"] = time.perf_counter() - t_begin
    return summary


def _record(db: Store, job: Job, out: dict, vers: dict) -> None:
    if "error" in out:
        log.warning("job %s (%s) failed: %s", job.key, job.label, out["error"])
        db.put(job.key, state="failed", error=out["error"], job_s=out.get("job_s"), finished=now())
        return
    m = out["metrics"] or {"float": {}, "quant": {}}
    q, f = m["quant"], m["float"]
    db.put(job.key, state="done", top1=q.get("top1"), top5=q.get("top5"), agreement=q.get("agreement"),
           kl=q.get("kl"), float_top1=f.get("top1"), float_top5=f.get("top5"), num_val=m.get("num_images"),
           quantize_s=out["quantize_s"], eval_s=out["eval_s"], job_s=out["job_s"], finished=now(), error=None,
           versions=vers, machine=out["machine"], state_path=out["state_path"],
           record={**out["record"], "calib_skipped": out["calib_skipped"], "val_skipped": out["val_skipped"]})


def _prep(kind: str, spec: dict, cfg: dict, threads: int, cache_dir: str | None = None, key: str = ""):
    """A Ray task: a calibration draw (with its synthetic images, written to and read from the folder
    ``cache_dir``), or an evaluation set with its float logits (cached on disk per key in ``cache_dir``)."""
    if kind == "calib" and uses_synthetic(cfg):
        return calib_with_synthetic(spec, cfg, cache_dir, threads)
    if kind == "calib":
        return calib_data(spec, cfg["calib"], cfg["num_calib"], cfg["seed"], cfg["batch_size"], threads)
    import numpy as np

    out = eval_data(spec, cfg, threads, cache_dir, key)
    if out["images"] is not None and out["images"].nbytes > SHARE_IMAGES_MB * 2**20:
        out["images"] = None  # jobs re-read a large set from disk, shard by shard
    out["labels"] = np.asarray(out["labels"])
    return out


def _job_task(cfg, calib, eval_refs, threads, state_dir, ckpt_prefix, shards, opts):
    """A Ray task: one job (evaluation sharded over ``shards`` further tasks when more than one). The evaluation
    set comes as a reference in a list (Ray passes it unresolved) so the shards can share it."""
    import ray

    eval_ref = eval_refs[0]
    evald = ray.get(eval_ref) if eval_ref is not None else None
    shard_fn = None
    if evald is not None and shards > 1:
        from vitq.sweep.shard import evaluate_shards

        def shard_fn(qmodel, data):
            return evaluate_shards(qmodel, eval_ref, len(data["sizes"]), shards, opts, threads, cfg["device"])
    return run_job(cfg, calib, evald, threads, state_dir, ckpt_prefix, shard_fn)
