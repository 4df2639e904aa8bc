"""Evaluation sharded over Ray workers: the batches of an evaluation set split into contiguous ranges, one Ray
task each, and the tasks' :class:`vitq.evaluate.Metrics` merged in batch order. Every batch holds the same
images as in a single-process run (shards start at batch boundaries), so the metrics are the same numbers,
KL included (it is summed batch by batch in the same order), given the same arithmetic on each worker (same
device kind and torch threads).
"""

from __future__ import annotations

import torch

from vitq.evaluate import Metrics, batch_ranges, evaluate_metrics
from vitq.sweep.cluster import require_ray, start_ray
from vitq.sweep.job import evaluate_job


def _merge(parts: list[Metrics]) -> Metrics:
    total = Metrics()
    for p in parts:
        total.merge(p)
    return total


def _shard_of_data(qmodel, data_refs, part, threads, device):
    import ray

    torch.set_num_threads(threads)
    data = ray.get(data_refs[0])
    return evaluate_job(qmodel.to(device), data, part, device)


def evaluate_shards(qmodel, data_ref, num_batches: int, shards: int, opts: dict, threads: int, device) -> Metrics:
    """Metrics of ``qmodel`` over a sweep's evaluation set (:func:`vitq.sweep.job.eval_data`, in the object
    store as ``data_ref``) in ``shards`` Ray tasks with resources ``opts``."""
    ray = require_ray()
    qref = ray.put(qmodel.cpu())
    task = ray.remote(max_retries=0)(_shard_of_data).options(**opts)
    refs = [task.remote(qref, [data_ref], part, threads, device) for part in batch_ranges(num_batches, shards)]
    qmodel.to(device)
    return _merge(ray.get(refs))


def _shard_of_records(qmodel, float_model, records, transform, batch_size, min_size, threads, device):
    from vitq.data import make_loader

    torch.set_num_threads(threads)
    loader = make_loader(records, transform, batch_size=batch_size, num_workers=0, min_size=min_size)
    m = evaluate_metrics(qmodel.to(device), float_model.to(device), loader, device=device)
    return m, list(loader.skipped)


def evaluate_records(qmodel, float_model, records, transform, batch_size: int, min_size, shards: int,
                     address: str | None = None, threads: int = 1, device="cpu",
                     num_cpus: int | None = None) -> tuple[dict, list[str]]:
    """``vitq evaluate --shards N``: :func:`vitq.evaluate.evaluate` of ``records`` (read from disk by each
    worker) in ``shards`` Ray tasks; returns (metrics, skipped paths). Starts a local Ray instance unless
    ``address`` names a cluster (the image paths must then be readable on every node)."""
    ray, _, started = start_ray(address, num_cpus)
    try:
        num_batches = -(-len(records) // batch_size)
        qref, fref = ray.put(qmodel.cpu()), ray.put(float_model.cpu())
        gpus = 1 if str(device).startswith("cuda") else 0
        task = ray.remote(max_retries=0)(_shard_of_records).options(num_cpus=threads, num_gpus=gpus)
        refs = [task.remote(qref, fref, records[p.start * batch_size:p.stop * batch_size], transform, batch_size,
                            min_size, threads, str(device))
                for p in batch_ranges(num_batches, shards)]
        parts = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    skipped = [s for _, sk in parts for s in sk]
    return _merge([m for m, _ in parts]).result(), skipped
