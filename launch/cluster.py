"""Joining or starting the Ray cluster a run uses."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import ray

from calibrl.config import Config


def connect_ray(address: str | None, *, num_cpus: int, quiet: bool = True) -> None:
    """Join `address` (trainer.ray_address) or $RAY_ADDRESS (set by `ray job submit`); otherwise start a
    local cluster. A cluster merely running on the machine is not joined uninvited. `quiet`: Ray's
    own info and warnings at start-up stay off the console (errors still show)."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    level = {"logging_level": logging.ERROR} if quiet else {}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # a job's driver (`calibrl submit`, `ray job submit`) runs under the job's runtime env, which
        # Ray will not merge with another one
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, **({} if in_job else {"runtime_env": env}), **level)
        print(f"[calibrl] joined the Ray cluster at {address}", file=sys.stderr, flush=True)
        return
    dashboard = os.environ.get("CALIBRL_DASHBOARD", "1") == "1"
    context = ray.init(num_cpus=num_cpus, runtime_env=env, include_dashboard=dashboard, **level)
    url = f"; dashboard http://{context.dashboard_url}" if dashboard and context.dashboard_url else ""
    print(f"[calibrl] started a local Ray cluster ({num_cpus} logical CPUs{url})", file=sys.stderr,
          flush=True)


def needed_cpus(cfg: Config) -> int:
    """Logical CPUs the run's actors reserve (a local cluster gets at least this many)."""
    r, ln, v = cfg.rollout, cfg.learner, cfg.verifier
    return int(np.ceil(r.num_workers * r.num_cpus_per_worker + ln.num_learners * ln.num_cpus_per_learner
                       + v.num_workers * v.num_cpus_per_worker + 0.5)) + 1
