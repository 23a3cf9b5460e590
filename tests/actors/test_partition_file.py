"""The ZeRO-3 export without a gather: each rank writes its partition of every parameter into one
safetensors file (actors/weight_files.py). Pure: the partitions are cut here as DeepSpeed cuts them
(flatten, pad to a multiple of the world size, rank r takes the r-th slice)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from actors.weight_files import (
    Partition,
    safetensors_layout,
    write_partitions,
)


def cut(state: dict[str, torch.Tensor], rank: int, world: int) -> list[Partition]:
    parts = []
    for name, t in state.items():
        size = math.ceil(t.numel() / world)
        flat = torch.cat([t.flatten(), torch.full((size * world - t.numel(),), float("nan"), dtype=t.dtype)])
        parts.append(Partition(name, t.dtype, tuple(t.shape), flat[rank * size:(rank + 1) * size].clone()))
    return parts


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("rank0_first", [True, False])
def test_every_rank_writes_its_slice_and_safetensors_reads_the_whole(tmp_path, world, rank0_first):
    torch.manual_seed(0)
    # sizes that leave padding for 2, 3 and 5 ranks, one tensor smaller than the world, mixed dtypes
    state = {"embed.weight": torch.randn(7, 5), "layer.0.bias": torch.randn(3),
             "layer.0.norm": torch.randn(11).to(torch.bfloat16), "scalar": torch.randn(1),
             "head.weight": torch.randn(4, 6)}
    path = str(tmp_path / "model.safetensors")
    written = 0
    # any order: the ranges are disjoint, and rank 0 (header, full size) may come first or last
    for rank in (range(world) if rank0_first else reversed(range(world))):
        written += write_partitions(path, cut(state, rank, world), rank)
    assert written == sum(t.numel() * t.element_size() for t in state.values())  # padding not written
    got = load_file(path)
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_header_is_padded_and_offsets_are_back_to_back():
    parts = [Partition("a", torch.float32, (2, 3), torch.zeros(6)),
             Partition("b", torch.bfloat16, (5,), torch.zeros(5))]
    prefix, starts = safetensors_layout(parts)
    assert len(prefix) % 8 == 0
    assert starts == [len(prefix), len(prefix) + 24]
