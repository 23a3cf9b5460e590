"""Weight sync learner -> rollout engines, one interface over two transports.

`push(version)` gathers the learners' full weights, moves them, and has every rollout worker load
them in place and serve them as `version`; it returns timings.
- `TransferWeightSync` (`rollout.weight_sync: auto`, the default; or `nccl` / `gloo`): vLLM's RL
  weight-transfer API. Learner rank 0 broadcasts over a process group that includes every
  engine's workers: NCCL on GPU (vLLM's engine), gloo on CPU (actors/gloo_transfer.py). The
  engines must be built with the same backend (`RolloutWorker(weight_sync=...)`).
- `ShmWeightSync` (`shm`): rank 0 writes safetensors to /dev/shm and each engine calls vLLM's
  `reload_weights` on the file. Works on CPU and GPU; benchmarks/weight_sync.py compares the two.

Under ZeRO-3 with every learner rank on one node, the shm export gathers nothing: each rank writes
its own partition of every parameter straight into the one safetensors file in /dev/shm
(`actors.weight_files.write_partitions`).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import ray
import torch


class ShmWeightSync:
    def __init__(self, learners, rollout_workers: list, *, root: str | None = None):
        self.learners, self.rollout_workers = learners, rollout_workers
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        self.root = root or os.path.join(base, f"calibrl-weights-{uuid.uuid4().hex[:8]}")

    def push(self, version: int, timeout: float | None = None) -> dict[str, float]:
        t0 = time.time()
        path = ray.get(self.learners.run("export_weights", version, self.root), timeout=timeout)[0]
        t1 = time.time()
        ray.get([w.load_weights_from_path.remote(version, path) for w in self.rollout_workers],
                timeout=timeout)
        t2 = time.time()
        self._prune(version)
        return {"time/sync_export_s": t1 - t0, "time/sync_load_s": t2 - t1, "time/sync_s": t2 - t0}

    def _prune(self, version: int) -> None:
        """Drop every older version: the engines now read only the current one."""
        for name in os.listdir(self.root):
            if name != f"v{version}":
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def reconnect(self, timeout: float | None = None) -> None:
        """Nothing to rebuild: every push writes a file each engine reads."""

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over calibrl's rollout actors: each call fans out to
    every engine and waits for all. Unlike vLLM's `RayVLLMWeightSyncClient` (one init payload for
    every handle), engine i joins the transfer group at `rank_offset + i * tensor_parallel_size`,
    so several engines, each with its own tensor-parallel workers, get distinct ranks. The round's
    weights version (`version`, set by the learner before it sends) reaches every engine with
    `finish_weight_update`."""

    def __init__(self, workers: list, tensor_parallel_size: int = 1):
        self.workers, self.tp = workers, tensor_parallel_size
        self.version: int | None = None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        ray.get([w.init_weight_transfer_engine.remote(engine_init_info(init_info, i, self.tp))
                 for i, w in enumerate(self.workers)])

    def start_weight_update(self) -> None:
        ray.get([w.start_weight_update.remote() for w in self.workers])

    def update_weights(self, update_info: dict) -> None:
        ray.get([w.update_weights.remote(update_info) for w in self.workers])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = int(weight_version) if weight_version is not None else self.version
        ray.get([w.finish_weight_update.remote(version) for w in self.workers])


def engine_init_info(init_info: dict, engine: int, tensor_parallel_size: int) -> dict:
    """Engine `engine`'s init payload: its workers' ranks start after the earlier engines'."""
    return init_info | {"rank_offset": init_info["rank_offset"] + engine * tensor_parallel_size}


def transfer_world_size(num_engines: int, tensor_parallel_size: int) -> int:
    """The transfer group: learner rank 0 (the sender) and every engine's tensor-parallel workers."""
    return 1 + num_engines * tensor_parallel_size


class TransferWeightSync:
    """vLLM's weight-transfer API: `nccl` (vLLM's engine, GPU) or `gloo` (actors/gloo_transfer.py,
    CPU). The same learner and driver code for both; only the backend name differs."""

    def __init__(self, learners, rollout_workers: list, *, backend: str, tensor_parallel_size: int = 1,
                 timeout_s: float = 1800.0):
        self.learners, self.rollout_workers = learners, rollout_workers
        self.options = {"backend": backend, "tensor_parallel_size": tensor_parallel_size,
                        "timeout_s": timeout_s}
        self.reconnect()

    def reconnect(self, timeout: float | None = None) -> None:
        """(Re)build the transfer group of learner rank 0 and every engine (after an engine restarted,
        its process is a new one)."""
        ray.get(self.learners.run("init_weight_transfer", self.rollout_workers, **self.options),
                timeout=timeout)

    def push(self, version: int, timeout: float | None = None) -> dict[str, float]:
        t0 = time.time()
        ray.get(self.learners.run("send_weights", version), timeout=timeout)
        return {"time/sync_s": time.time() - t0}

    def close(self) -> None:
        pass


def weight_sync_backend(name: str) -> str:
    """`rollout.weight_sync` resolved: `auto` is vLLM's weight-transfer API, NCCL where CUDA is
    present and gloo elsewhere."""
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


def make_weight_sync(cfg, learners, rollout_workers: list):
    """The run's weight sync from `rollout.weight_sync` (shm, nccl, gloo or auto)."""
    backend = weight_sync_backend(cfg.rollout.weight_sync)
    if backend == "shm":
        return ShmWeightSync(learners, rollout_workers)
    return TransferWeightSync(learners, rollout_workers, backend=backend,
                              tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                              timeout_s=cfg.reliability.sync_timeout_s)
