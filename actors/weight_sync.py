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
(`write_partitions`; a partition is a contiguous byte range of the flattened tensor).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass

import ray
import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def make_weight_sync(cfg, learners, rollout_workers: list):
    """The run's weight sync from `rollout.weight_sync` (shm, nccl, gloo or auto)."""
    backend = weight_sync_backend(cfg.rollout.weight_sync)
    if backend == "shm":
        return ShmWeightSync(learners, rollout_workers)
    return TransferWeightSync(learners, rollout_workers, backend=backend,
                              tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                              timeout_s=cfg.reliability.sync_timeout_s)


def link_model_files(model_path: str, weights_dir: str) -> None:
    """Make `weights_dir` a complete model directory: vLLM's `reload_weights(weights_path=...)`
    re-points the engine's model path there, and later requests load the processor from it."""
    for name in os.listdir(model_path):
        if name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            continue
        dst = os.path.join(weights_dir, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(os.path.join(model_path, name)), dst)


# ---- one safetensors file written by every ZeRO-3 rank in place ---------------------------------


@dataclass(frozen=True)
class Partition:
    """One rank's part of one parameter: ZeRO-3 flattens the tensor, pads it to a multiple of the
    world size and gives rank r the elements [r * size, (r + 1) * size) of that (`ds_tensor`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    local: torch.Tensor  # this rank's flat partition, `size` elements, padding included


def safetensors_layout(parts: list[Partition]) -> tuple[bytes, list[int]]:
    """The file's leading bytes (length prefix and JSON header, padded to 8 bytes as safetensors
    writes it) for these tensors back to back in this order, and each tensor's byte offset in the
    file."""
    entries, starts, pos = {}, [], 0
    for p in parts:
        nbytes = math.prod(p.shape) * p.dtype.itemsize
        entries[p.name] = {"dtype": SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                           "data_offsets": [pos, pos + nbytes]}
        starts.append(pos)
        pos += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    prefix = struct.pack("<Q", len(header)) + header
    return prefix, [len(prefix) + s for s in starts]


def write_partitions(path: str, parts: list[Partition], rank: int) -> int:
    """Write this rank's elements of every tensor at their place in the file, creating it if need
    be (padding dropped); rank 0 also writes the header and sets the file's full size. Returns the
    bytes of tensor data written. The ranks write disjoint ranges, so they may run at once, in any
    order; the file is complete once every rank has returned."""
    prefix, starts = safetensors_layout(parts)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if rank == 0:
            end = starts[-1] + math.prod(parts[-1].shape) * parts[-1].dtype.itemsize if parts else len(prefix)
            os.ftruncate(fd, end)  # cuts nothing a rank wrote: every range ends by `end`
            os.pwrite(fd, prefix, 0)
        for p, start in zip(parts, starts):
            size, numel = p.local.numel(), math.prod(p.shape)
            first = rank * size
            n = max(0, min(size, numel - first))
            if n == 0:
                continue
            data = memoryview(p.local[:n].detach().cpu().contiguous().view(torch.uint8).numpy())
            offset = start + first * p.dtype.itemsize
            while data:  # pwrite may write less than asked
                k = os.pwrite(fd, data, offset)
                data, offset, written = data[k:], offset + k, written + k
    finally:
        os.close(fd)
    return written
