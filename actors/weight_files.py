"""The weight files a learner writes for the rollout engines (no Ray: a learner rank imports this
under any launcher).

- `link_model_files`: makes a weights folder a complete model directory (config, tokenizer,
  processor linked from the checkpoint) for vLLM's `reload_weights`.
- `write_partitions`: under ZeRO-3 with every learner rank on one node, each rank writes its own
  partition of every parameter straight into one safetensors file in /dev/shm, no gather (a
  partition is a contiguous byte range of the flattened tensor).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
