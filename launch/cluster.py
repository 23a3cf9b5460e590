"""Joining or starting the Ray cluster a run uses."""

from __future__ import annotations

import os
import sys

import numpy as np
import ray

from calibrl.config import Config


def connect_ray(address: str | None, *, num_cpus: int) -> None:
    """Join `address` (trainer.ray_address) or $RAY_ADDRESS (set by `ray job submit`); otherwise start a
    local cluster. A cluster merely running on the machine is not joined uninvited."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        print(f"[calibrl] joined the Ray cluster at {address}", file=sys.stderr)
        return
    dashboard = os.environ.get("CALIBRL_DASHBOARD", "1") == "1"
    ray.init(num_cpus=num_cpus, runtime_env=env, include_dashboard=dashboard)
    print(f"[calibrl] started a local Ray cluster ({num_cpus} logical CPUs)", file=sys.stderr)


def needed_cpus(cfg: Config) -> int:
    """Logical CPUs the run's actors reserve (a local cluster gets at least this many)."""
    r, ln, v = cfg.rollout, cfg.learner, cfg.verifier
    return int(np.ceil(r.num_workers * r.num_cpus_per_worker + ln.num_learners * ln.num_cpus_per_learner
                       + v.num_workers * v.num_cpus_per_worker + 0.5)) + 1
