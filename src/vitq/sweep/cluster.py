"""Ray, optional: a clear error naming the ``sweep`` extra when it is missing, and one way to start or join it."""

from __future__ import annotations

import logging
import os
import time

from vitq.errors import VitqError


def require_ray():
    try:
        import ray
    except ImportError:
        raise VitqError("vitq sweep needs Ray: pip install 'vitq[sweep]' (installs ray and pyyaml)") from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to ``address``, or start a local instance limited to ``num_cpus`` / ``num_gpus``; returns
    (ray, seconds, started here)."""
    ray = require_ray()
    t0 = time.perf_counter()
    if ray.is_initialized():
        return ray, 0.0, False
    env = {"PYTHONPATH": os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")) if p)}
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
              configure_logging=True)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if not address.startswith("ray://") else None, **kw)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private instance: no token file in ~/.ray
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the workers import this vitq, installed or not
        # Ray starts workers at nice 15; the jobs are this command's work, so they run at its priority (on a
        # shared machine they would otherwise get a fraction of the CPU a standalone vitq quantize gets)
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kw)
    return ray, time.perf_counter() - t0, True
