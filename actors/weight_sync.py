"""Weight sync learner -> rollout engines, one interface over two transports.

`push(version)` gathers the learners' full weights, moves them, and has every rollout worker load
them in place; it returns timings. `ShmWeightSync` writes safetensors to /dev/shm (rank 0) and
each engine calls vLLM's `reload_weights` on the file: works on CPU and GPU. `NcclWeightSync`
uses vLLM's RL weight-transfer API: learner rank 0 broadcasts over a NCCL group that includes
every engine (GPU only; the engines must be built with `weight_sync="nccl"`).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import ray


class ShmWeightSync:
    def __init__(self, learners, rollout_workers: list, *, root: str | None = None):
        self.learners, self.rollout_workers = learners, rollout_workers
        base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        self.root = root or os.path.join(base, f"calibrl-weights-{uuid.uuid4().hex[:8]}")

    def push(self, version: int) -> dict[str, float]:
        t0 = time.time()
        path = ray.get(self.learners.run("export_weights", version, self.root))[0]
        t1 = time.time()
        ray.get([w.load_weights_from_path.remote(version, path) for w in self.rollout_workers])
        t2 = time.time()
        self._prune(version)
        return {"time/sync_export_s": t1 - t0, "time/sync_load_s": t2 - t1, "time/sync_s": t2 - t0}

    def _prune(self, version: int) -> None:
        """Drop every older version: the engines now read only the current one."""
        for name in os.listdir(self.root):
            if name != f"v{version}":
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class NcclWeightSync:
    """vLLM's dense NCCL weight transfer (GPU). Learner rank 0 is NCCL rank 0, the engines follow."""

    def __init__(self, learners, rollout_workers: list, *, tensor_parallel_size: int = 1):
        self.learners, self.rollout_workers = learners, rollout_workers
        world = 1 + len(rollout_workers) * tensor_parallel_size
        ray.get(self.learners.run("init_nccl_weight_sync", rollout_workers, world))

    def push(self, version: int) -> dict[str, float]:
        t0 = time.time()
        ray.get(self.learners.run("broadcast_weights", version))
        return {"time/sync_s": time.time() - t0}

    def close(self) -> None:
        pass


def link_model_files(model_path: str, weights_dir: str) -> None:
    """Make `weights_dir` a complete model directory: vLLM's `reload_weights(weights_path=...)`
    re-points the engine's model path there, and later requests load the processor from it."""
    for name in os.listdir(model_path):
        if name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            continue
        dst = os.path.join(weights_dir, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(os.path.join(model_path, name)), dst)


WEIGHT_SYNCS = {"shm": ShmWeightSync, "nccl": NcclWeightSync}
