"""vLLM's weight-transfer API over gloo: the CPU twin of vLLM's dense NCCL engine.

vLLM 0.32 moves trainer weights into a live engine through a pair of engines: a worker-side
`WeightTransferEngine` (selected by `LLM(weight_transfer_config={"backend": ...})`, driven by the
worker's `init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`) and a trainer-side `TrainerWeightTransferEngine` (`trainer_init`, then
`send_weights()` once per round). vLLM ships NCCL (GPU). This module registers a `gloo` pair under
the same protocol, so that the learner and driver code a GPU run takes (`actors.weight_sync.
TransferWeightSync`) runs on CPU too: only the backend name differs.

The wire: learner rank 0 is rank 0 of a process group of its own (a stateless gloo group from
vLLM's helper: the DeepSpeed group is untouched), the engines' workers follow at
`rank_offset + worker rank`. Each round the trainer sends the parameters' names, dtypes and shapes
through the control plane (Ray), then broadcasts their bytes in buckets of at most
`bucket_bytes`; a worker cuts each bucket back into tensors and hands them to the model's
`load_weights` between vLLM's layerwise-reload start and finish (what `reload_weights` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import (
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)

BACKEND = "gloo"
DEFAULT_BUCKET_BYTES = 256 * 1024**2
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side: where the group meets and this engine's first rank in it."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, backend="gloo",
                                                          timeout=timedelta(seconds=timeout_s))


def buckets(meta: list[ParamMeta], bucket_bytes: int) -> Iterator[list[int]]:
    """Consecutive parameter indices whose bytes fit in `bucket_bytes` (a larger one goes alone)."""
    bucket, size = [], 0
    for i, m in enumerate(meta):
        n = _slot(m)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += n
    if bucket:
        yield bucket


def _nbytes(m: ParamMeta) -> int:
    numel = 1
    for d in m.shape:
        numel *= d
    return numel * torch.empty((), dtype=m.dtype).element_size()


def _slot(m: ParamMeta) -> int:
    """Bytes a parameter takes in a bucket: padded to 8 so every slot is aligned for its dtype."""
    return -(-_nbytes(m) // 8) * 8


def _as_tensor(slot: torch.Tensor, m: ParamMeta) -> torch.Tensor:
    return slot[:_nbytes(m)].view(m.dtype).view(m.shape)


def _broadcast(group, buffer: torch.Tensor) -> None:
    group.broadcast(buffer, 0).wait()


def _meta(info: GlooWeightTransferUpdateInfo) -> list[ParamMeta]:
    return [ParamMeta(n, getattr(torch, d), tuple(s))
            for n, d, s in zip(info.names, info.dtype_names, info.shapes)]


class GlooWeightTransferEngine(
        WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Worker side: receives the trainer's buckets and loads them in place."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = open_group(init_info.master_address, init_info.master_port, rank,
                                init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # the base class ends with torch.accelerator.synchronize(), which raises without an accelerator
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        meta = _meta(update_info)
        for bucket in buckets(meta, self.bucket_bytes):
            sizes = [_slot(meta[i]) for i in bucket]
            buffer = torch.empty(sum(sizes), dtype=torch.uint8)
            _broadcast(self.group, buffer)
            tensors = [_as_tensor(part, meta[i]) for i, part in zip(bucket, torch.split(buffer, sizes))]
            self.model.load_weights([(meta[i].name, t) for i, t in zip(bucket, tensors)])

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side, the protocol of vLLM's `NCCLTrainerWeightTransferEngine`: `trainer_init` and
    `send_weights` run on every trainer rank; rank 0 opens the group and drives the engines through
    the client, the others only iterate the source (under ZeRO-3 the iteration gathers)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("gloo trainer weight transfer requires a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s)
        # the workers block in the rendezvous inside init_weight_transfer_engine: meet them there
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = open_group(init_info.master_address, init_info.master_port, 0,
                                      init_info.world_size, init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # stay in the trainer-side gathers
                pass
            return
        update = GlooWeightTransferUpdateInfo(names=[m.name for m in meta],
                                              dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                              shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            # the engines receive inside update_weights, concurrently with this side's broadcasts
            future = pool.submit(self.client.update_weights, asdict(update))
            pairs = iter(self.source)
            for bucket in buckets(meta, self.bucket_bytes):
                sizes = [_slot(meta[i]) for i in bucket]
                buffer = torch.empty(sum(sizes), dtype=torch.uint8)
                # copied as yielded: a ZeRO-3 source re-partitions a tensor once its layer is done
                for i, part in zip(bucket, torch.split(buffer, sizes)):
                    name, tensor = next(pairs)
                    if name != meta[i].name or tuple(tensor.shape) != meta[i].shape:
                        raise ValueError(f"weight source yielded {name} {tuple(tensor.shape)} where its "
                                         f"metadata declared {meta[i].name} {meta[i].shape}")
                    _as_tensor(part, meta[i]).copy_(tensor.detach())
                _broadcast(self.group, buffer)
            future.result()
        finally:
            pool.shutdown(wait=False)  # never join a receiver stuck in a broken group
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make the `gloo` backend known to vLLM's factories in this process (idempotent)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)
