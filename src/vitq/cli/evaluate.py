"""``vitq evaluate``: reload a saved state (no recalibration) and evaluate it."""

from __future__ import annotations

import logging
import os

from vitq.cli.common import (
    build_model,
    check_class_map,
    common_flags,
    evaluate_on,
    input_size,
    read_labels,
    resolve_device,
    summary_line,
    versions,
)
from vitq.errors import VitqError
from vitq.state import make_parents, remove_created

log = logging.getLogger("vitq")


def add_command(sub) -> None:
    e = sub.add_parser("evaluate", help="reload a saved state (no recalibration) and evaluate it")
    common_flags(e)
    e.add_argument("--state", required=True, help="folder written by vitq quantize --out")
    e.add_argument("--val", required=True, help="evaluation image folder")
    e.add_argument("--num-val", type=int, default=None)
    e.add_argument("--out", required=True, help="results JSON file to write")
    e.add_argument("--shards", type=int, default=None, metavar="N",
                   help="evaluate in N Ray tasks (each reads its part of the images; same metrics as one process); "
                        "needs the sweep extra")
    e.add_argument("--address", default=None,
                   help="with --shards: an existing Ray cluster (default: a local instance on this machine)")
    e.set_defaults(func=cmd_evaluate)



def cmd_evaluate(args) -> int:
    import vitq.cli.validate as validate
    from vitq.data import model_transform
    from vitq.state import check_output_file, load, write_json

    progress = not args.quiet
    out = os.path.abspath(args.out)
    check_output_file(args.out, args.overwrite)
    validate.positive("--batch-size", args.batch_size)
    validate.positive("--num-val", args.num_val)
    validate.non_negative("--num-workers", args.num_workers)
    validate.positive("--shards", args.shards)
    if args.address and not args.shards:
        raise VitqError(f"--address {args.address} needs --shards N (the Ray tasks to evaluate in)")
    saved = validate.state_folder(args.state)
    if saved.get("model") not in (None, args.model):
        raise VitqError(f"--state {args.state} was made for model {saved['model']}, not --model {args.model}")
    device = resolve_device(args.device)
    validate.weights_file(args.weights)
    kwargs = validate.model_args(args.model_args) if args.model_args is not None else saved.get("model_args", {})
    class_map = read_labels(args)
    records = validate.image_records("--val", args.val, args.num_val, "--num-val", args.seed, args.labels, class_map)
    model, weights_sha = build_model(args, kwargs)
    check_class_map(model, class_map, args)
    if saved.get("weights_sha256") and weights_sha and saved["weights_sha256"] != weights_sha:
        log.warning("--weights %s differs from the weights the state was calibrated with (sha256 mismatch)",
                    args.weights)
    qmodel = load(model, args.state).to(device)
    _, desc = model_transform(model)
    if args.shards:
        metrics, skipped, eval_s = evaluate_sharded(qmodel, model, records, args, device, input_size(desc))
    else:
        metrics, skipped, eval_s = evaluate_on(qmodel, model, records, args, device, progress, input_size(desc))
    results = {"model": args.model, "weights_sha256": weights_sha, "state": os.path.abspath(args.state),
               "scheme": saved["scheme"]["name"], "method": saved.get("method"), "refine": saved.get("refine"),
               "w_bits": saved["scheme"]["w_bits"], "a_bits": saved["scheme"]["a_bits"], "seed": args.seed,
               "threads": args.threads, "val_dir": os.path.abspath(args.val), "num_val": metrics["num_images"],
               "labels": args.labels, "class_map": os.path.abspath(args.class_map) if class_map else None,
               "val_skipped": skipped, "float": metrics["float"], "quant": metrics["quant"],
               "timings": {"eval_s": eval_s}, "shards": args.shards, "versions": versions(),
               "command": ["vitq", *args.argv]}
    created = make_parents(out)
    try:
        write_json(out, results)
    except BaseException:
        remove_created(created)
        raise
    print(summary_line(results))
    print(f"wrote {out}")
    return 0


def evaluate_sharded(qmodel, model, records, args, device, min_size) -> tuple[dict, list[str], float]:
    """--shards N: the images in N contiguous parts (whole batches), one Ray task each, metrics merged."""
    import time

    from vitq.cli.common import labels_mean_classes
    from vitq.data import model_transform
    from vitq.sweep.shard import evaluate_records

    transform, _ = model_transform(model)
    t0 = time.perf_counter()
    metrics, skipped = evaluate_records(qmodel, model, records, transform, args.batch_size, min_size, args.shards,
                                        address=args.address, threads=args.threads, device=device)
    if metrics["num_images"] == 0:
        raise VitqError(f"--val {args.val}: none of the {len(records)} evaluation images could be read")
    if skipped:
        log.warning("skipped %d unreadable evaluation image(s) of %d (e.g. %s)", len(skipped), len(records),
                    skipped[0])
    if not labels_mean_classes(args):
        for side in ("float", "quant"):
            metrics[side]["top1"] = metrics[side]["top5"] = None
    return metrics, skipped, time.perf_counter() - t0
