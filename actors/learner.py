"""Learner: one DeepSpeed ZeRO data-parallel rank per actor (`learner-0`, `learner-1`, ...).

Created by `Learner.from_config(cfg)`: an `ActorGroup(Learner, n, name_prefix="learner", ...)`,
which hands every rank rank 0's address and a free port; the ranks form one torch.distributed
group (gloo on CPU, NCCL on GPU).

Every rank receives the whole step batch (one object in Ray's store) and takes its own rows, so
global normalisers (token and sequence counts of a mini-batch) are known locally, without a
collective. Gradient accumulation is owned here (DeepSpeed's `managed_gradient_accumulation:
false`): each micro-batch's loss is already its share of the mini-batch loss (normalised by the
mini-batch's global token count), so backward runs unscaled and DeepSpeed's data-parallel
gradient mean is undone by multiplying by the world size. The update therefore does not depend
on the micro-batch size or the number of ranks. All maths (log-probs, entropy, losses) comes
from `calibrl`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from actors.logs import actor_log_dir, forward_warnings
from actors.weight_files import Partition, link_model_files, write_partitions
from calibrl.algo import (
    TrainBatch,
    compile_loss_kernels,
    compute_loss,
    has_signal,
    loss_kernels_compiled,
    loss_normalizers,
)
from calibrl.config import Config
from calibrl.inputs import image_tensors
from calibrl.modeling import response_logprobs

if TYPE_CHECKING:
    from actors.group import ActorGroup


def mini_batches_by_group(batch: TrainBatch, n: int) -> list[TrainBatch]:
    """`n` mini-batches of consecutive groups (a group's responses and expert stay together)."""
    groups = int(batch.group_index.max()) + 1 if len(batch) else 0
    bounds = torch.linspace(0, groups, n + 1).round().long()
    return [batch.select(torch.nonzero((batch.group_index >= lo) & (batch.group_index < hi)).flatten())
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


LOSS_METRICS = {"pg_loss": "loss/pg", "calib_loss": "loss/calib", "loss": "loss/total"}


def metric_name(key: str) -> str:
    """The logged name of a `compute_loss` metric: the loss terms under `loss/`, the rest under `train/`."""
    return LOSS_METRICS.get(key, f"train/{key}")


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    if device.type == "cpu":
        return batch
    return TrainBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.to_dict().items()})


def ds_config(*, zero_stage: int, grad_clip: float, bf16: bool, micro_batch_per_device: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_per_device,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # this class decides where a mini-batch ends
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW (DeepSpeed's fused Adam is CUDA-only)
        # a non-finite gradient norm skips the update (DeepSpeed clears the gradients; Adam's state and
        # the weights stay as they were); on by default for fp32, asked for under bf16
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0,
                                        stage3_gather_16bit_weights_on_model_save=True)
    return cfg


def lr_lambda(*, warmup_steps: int, total_steps: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


class Learner:
    def __init__(self, *, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 zero_stage: int = 2, lr: float = 1e-6, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 lr_warmup_steps: int = 0, lr_schedule: str = "constant", total_updates: int = 1000,
                 micro_batch_per_device: int = 4, gradient_checkpointing: bool = False,
                 optimizer: str = "adamw", seed: int = 0, temperature: float = 1.0,
                 image_min_pixels: int | None = None, image_max_pixels: int | None = None,
                 compile_loss: bool | None = None, pad_to_multiple_of: int | None = None):
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        forward_warnings("DeepSpeed")  # its logger does not propagate to the root logger
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
        )

        self.rank, self.world_size = rank, world_size
        self.micro_batch_per_device = micro_batch_per_device
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if not cuda:
            skip_shm_all_reduce()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        torch.manual_seed(seed + rank)
        compiled = compile_loss if compile_loss is not None else cuda
        # the response length a training batch is padded to a multiple of (learner.pad_to_multiple_of)
        self.pad_multiple = pad_to_multiple_of or (16 if compiled and cuda else 1)
        if compiled:
            compile_loss_kernels(length_multiple=self.pad_multiple)

        vl = hasattr(AutoConfig.from_pretrained(model_path), "vision_config")
        cls = AutoModelForImageTextToText if vl else AutoModelForCausalLM
        model = cls.from_pretrained(model_path, dtype=torch.bfloat16 if cuda else torch.float32)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # the image area bounds of model.image_min/max_pixels, which vLLM and the driver use too (the
        # checkpoint's own defaults would give another number of image tokens for a large image)
        pixels = {k: v for k, v in (("min_pixels", image_min_pixels), ("max_pixels", image_max_pixels))
                  if v is not None}
        self.image_processor = AutoImageProcessor.from_pretrained(model_path, **pixels) if vl else None
        self.model_path = model_path

        optimizer = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
                     if optimizer == "adamw"
                     else torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(warmup_steps=lr_warmup_steps, total_steps=total_updates, schedule=lr_schedule))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(zero_stage=zero_stage, grad_clip=grad_clip, bf16=cuda,
                             micro_batch_per_device=micro_batch_per_device))
        self.zero_stage = zero_stage
        self.colocated = zero_stage == 3 and all_on_one_node(world_size)
        self.updates = 0
        self.temperature = temperature  # the rollout's: log-probs are those of pi(. | T), sampled from

    @classmethod
    def from_config(cls, cfg: Config) -> ActorGroup:
        """The run's `learner.num_learners` ranks, actors `learner-0..` in one placement group (a GPU
        each where CUDA is present). The LR schedule counts optimizer updates: steps x mini-batches
        x epochs."""
        from actors.group import ActorGroup

        ln = cfg.learner
        updates_per_step = (cfg.trainer.prompts_per_step // ln.mini_batch_prompts) * ln.ppo_epochs
        return ActorGroup(
            cls, ln.num_learners, name_prefix="learner", num_cpus_per_actor=ln.num_cpus_per_learner,
            num_gpus_per_actor=ln.num_gpus_per_learner if torch.cuda.is_available() else 0,
            model_path=cfg.model.path,
            zero_stage=ln.zero_stage, lr=ln.lr, weight_decay=ln.weight_decay, grad_clip=ln.grad_clip,
            lr_warmup_steps=ln.lr_warmup_steps * updates_per_step, lr_schedule=ln.lr_schedule,
            total_updates=cfg.trainer.total_steps * updates_per_step,
            micro_batch_per_device=ln.micro_batch_per_device,
            gradient_checkpointing=cfg.model.gradient_checkpointing, optimizer=ln.optimizer,
            seed=cfg.trainer.seed, temperature=cfg.rollout.temperature,
            image_min_pixels=cfg.model.image_min_pixels, image_max_pixels=cfg.model.image_max_pixels,
            compile_loss=ln.compile_loss, pad_to_multiple_of=ln.pad_to_multiple_of,
            log_dir=actor_log_dir(cfg))

    # ---- batch plumbing ---------------------------------------------------------------------

    def _my_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of `rows`, cut into micro-batches; every rank gets the same number of
        micro-batches (an empty one where a rank runs short) so ZeRO's collectives stay in step."""
        mine = rows[self.rank::self.world_size]
        n_micro = math.ceil(math.ceil(len(rows) / self.world_size) / self.micro_batch_per_device)
        return list(torch.tensor_split(mine, n_micro)) if n_micro else []

    def _forward(self, batch: TrainBatch, rows: torch.Tensor, *, with_entropy: bool):
        """Response log-probs (and entropy) for `rows` of the batch, on this rank's device."""
        mb = batch.select(rows)
        vis = {}
        if self.image_processor is not None:
            images = [img for row in mb.prompt_images for img in row]
            if images:
                vis = {k: v.to(self.device) for k, v in self._image_tensors(tuple(images)).items()}
        d = self.device
        return response_logprobs(self.engine, mb.prompt_ids.to(d), mb.prompt_mask.to(d),
                                 mb.response_ids.to(d), mb.response_mask.to(d), with_entropy=with_entropy,
                                 temperature=self.temperature, config=self.engine.module.config, **vis)

    @lru_cache(maxsize=64)  # noqa: B019 - one learner per actor process, alive for the whole run
    def _image_tensors(self, images: tuple[bytes, ...]) -> dict[str, torch.Tensor]:
        return image_tensors(self.image_processor, images)

    # ---- the three jobs of a learner ----------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Old log-probs and token entropy of this rank's rows (all rows: on-policy and expert).
        Returns {'rows', 'logp', 'entropy'}; the driver scatters the ranks' results back."""
        self.engine.eval()
        rows = torch.arange(batch.response_ids.shape[0])
        mine = rows[self.rank::self.world_size]
        logps, ents = [], []
        # every rank runs the same number of forwards (a rank that runs short repeats row 0 and drops
        # the result): ZeRO-3 gathers each layer's parameters from all ranks on every forward
        for chunk in self._my_rows(rows):
            lp, ent = self._forward(batch, chunk if len(chunk) else rows[:1], with_entropy=True)
            if len(chunk):
                logps.append(lp.float().cpu())
                ents.append(ent.float().cpu())
        empty = torch.zeros(0, batch.response_ids.shape[1])
        return {"rows": mine, "logp": torch.cat(logps) if logps else empty,
                "entropy": torch.cat(ents) if ents else empty}

    def train_step(self, batch: TrainBatch, *, loss_name: str, loss_kwargs: dict, mini_batches: int = 1,
                   epochs: int = 1) -> dict[str, float]:
        """One optimizer update per mini-batch (consecutive groups), `epochs` passes over the batch.
        A mini-batch whose loss has no gradient (`has_signal`: every advantage 0) is skipped, so
        Adam's momentum does not move the weights with nothing to learn from; one whose gradient norm
        is not finite (a NaN or inf loss) is not applied (DeepSpeed's overflow check) and counted.

        `loss_kwargs` are `calibrl.algo.compute_loss`'s keywords (clip_low, alpha, lam, agg, ...).
        Returns this rank's share of the loss metrics, plus the mean gradient norm (before clipping)
        and update norm (||delta theta||, all ranks) over the updates taken, the skipped count, and the
        non-finite ones (`train/nonfinite_updates`; `train/nonfinite_trailing`: how many in a row end the
        step)."""
        self.engine.train()
        t0 = time.time()
        batch = batch.pad_responses(self.pad_multiple)
        # per key set, the metrics summed on the device (float() per metric would wait for it)
        sums: dict[tuple[str, ...], torch.Tensor] = {}
        micro_count, skipped, nonfinite, trailing = 0, 0, 0, 0
        grad_norms, update_norms = [], []
        coefs = {k: loss_kwargs.get(k, 0.0) for k in ("entropy_coef", "kl_coef")}
        for _ in range(epochs):
            for mini in mini_batches_by_group(batch, mini_batches):
                # every rank sees the whole mini-batch: all agree
                if not has_signal(loss_name, mini, **coefs):
                    skipped += 1
                    continue
                # global counts: every rank sees the whole mini-batch
                norms = loss_normalizers(loss_name, mini)
                for rows in self._my_rows(torch.arange(len(mini))):
                    empty = len(rows) == 0
                    rows = rows if not empty else torch.tensor([0])
                    logp, entropy = self._forward(mini, rows, with_entropy=coefs["entropy_coef"] > 0)
                    loss, metrics = compute_loss(loss_name, logp, to_device(mini.select(rows), self.device),
                                                 entropy=entropy, **norms, **loss_kwargs)
                    # DeepSpeed averages gradients over ranks; this loss is already a share of the global one
                    self.engine.backward(loss * (0.0 if empty else float(self.world_size)),
                                         scale_wrt_gas=False)
                    if not empty:
                        micro_count += 1
                        names = tuple(metrics)  # detached 0-d tensors, the same keys every micro-batch
                        values = torch.stack(list(metrics.values())).double()
                        sums[names] = sums[names] + values if names in sums else values
                self.engine.step()
                norm = self.engine.get_global_grad_norm()
                if norm is not None and not math.isfinite(float(norm)):
                    nonfinite += 1  # DeepSpeed skipped this update
                    trailing += 1
                    continue
                trailing = 0
                self.updates += 1
                grad_norms.append(float(norm or 0.0))
                update_norms.append(self._update_norm())
        taken = len(grad_norms)
        # losses are shares of a mini-batch's loss: their sum over micro-batches is this rank's share
        out = {metric_name(k): v / max(1, taken)
               for names, values in sums.items() for k, v in zip(names, values.tolist())}  # one copy each
        out["train/grad_norm"] = sum(grad_norms) / max(1, taken)
        out["train/update_norm"] = sum(update_norms) / max(1, taken)
        out["train/skipped_updates"] = float(skipped)
        out["train/nonfinite_updates"] = float(nonfinite)
        out["train/nonfinite_trailing"] = float(trailing)
        out["train/updates_applied"] = float(taken)
        out["train/lr"] = float(self.scheduler.get_last_lr()[0])
        out["train/loss_compiled"] = float(loss_kernels_compiled())
        out["train/micro_batches"] = micro_count
        out["time/train_rank_s"] = time.time() - t0
        return out

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's ZeRO wrapper (its state holds this rank's partition)."""
        return self.optimizer.optimizer if self.zero_stage > 0 else self.optimizer

    def _update_norm(self) -> float:
        """||delta theta|| of the AdamW step just taken, over all ranks' partitions, from the optimizer
        state: lr * m_hat / (sqrt(v_hat) + eps) + lr * wd * theta (0.0 under SGD)."""
        import torch.distributed as dist

        base = self._base_optimizer()
        total = torch.zeros((), dtype=torch.float64)
        if isinstance(base, torch.optim.AdamW):
            # walk the state, not param_groups: ZeRO-3 puts each sub-group's flat fp32 partition in
            # param_groups only for the duration of its step (one group's hyperparameters serve all)
            group = base.param_groups[0]
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p, st in base.state.items():
                if "exp_avg" not in st:
                    continue
                t = float(st["step"])
                step = st["exp_avg"] / (1 - b1**t) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)
                if wd:
                    step = step + wd * p.detach()
                total += float((lr * step).double().pow(2).sum())
        if self.world_size > 1:
            total = total.to(self.device)
            dist.all_reduce(total)
        return float(total.sqrt())

    def reset_optimizer(self) -> None:
        """Zero the optimizer's moments and step count (e.g. between SFT warm-up and RL): the RL phase
        then starts as a fresh run would, not with Adam's second moments scaled to SFT's gradients."""
        for st in self._base_optimizer().state.values():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    st[key] = 0

    def set_lr(self, lr: float) -> None:
        """Change the peak learning rate (the schedule's multiplier still applies), e.g. after SFT warm-up."""
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * factor

    # ---- weights out: to the rollout engines and to disk ----------------------------------------

    @contextmanager
    def gathered_state_dict(self) -> Iterator[dict[str, torch.Tensor]]:
        """Full HF-named weights on CPU, valid inside the context (under ZeRO-3 they are gathered on
        entry and partitioned again on exit: every rank must enter it)."""
        import deepspeed

        named = list(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            yield {n: p.detach().cpu() for n, p in named}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on CPU, as independent tensors; under ZeRO-3 every rank must call this
        (it gathers). Cloned under ZeRO-2 too: there the parameters are views into DeepSpeed's flat
        buffer, and shipping a view through Ray would copy the whole buffer once per parameter."""
        with self.gathered_state_dict() as state:
            return {n: t.clone() for n, t in state.items()}

    def export_weights(self, version: int, out_dir: str) -> str | None:
        """Write the full state dict as safetensors under out_dir/v{version} (rank 0); returns the path."""
        from safetensors.torch import save_file

        path = os.path.join(out_dir, f"v{version}")
        if self.colocated:  # ZeRO-3 on one node: each rank writes its partitions, nothing is gathered
            write_partitioned(self.engine.module, os.path.join(path, "model.safetensors"), self.rank)
            if self.rank != 0:
                return None
        else:
            # written while gathered: no rank copies the weights (a copy costs as much as the write)
            with self.gathered_state_dict() as state:
                if self.rank != 0:
                    return None
                os.makedirs(path, exist_ok=True)
                save_file({k: v.contiguous() for k, v in state.items()},
                          os.path.join(path, "model.safetensors"))
        link_model_files(self.model_path, path)
        return path

    def init_weight_transfer(self, rollout_workers: list, *, backend: str, tensor_parallel_size: int = 1,
                             timeout_s: float = 1800.0) -> None:
        """Join vLLM's weight-transfer group with the engines (every rank calls this; rank 0 sends):
        `nccl` on GPU, `gloo` on CPU (actors/gloo_transfer.py), through vLLM's trainer factory."""
        import torch.distributed as dist
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from actors.gloo_transfer import GlooTrainerInitInfo, register
        from actors.group import free_port, node_address
        from actors.weight_sync import EngineClient, transfer_world_size

        register()
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo as InitInfo
        else:
            InitInfo = GlooTrainerInitInfo
        addr_port = [node_address(), free_port()] if self.rank == 0 else [None, None]
        if self.world_size > 1:
            dist.broadcast_object_list(addr_port, src=0)
        info = InitInfo(master_address=addr_port[0], master_port=addr_port[1],
                        world_size=transfer_world_size(len(rollout_workers), tensor_parallel_size),
                        rank=self.rank, **({"timeout_s": timeout_s} if backend == "gloo" else {}))
        self.transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=EngineClient(rollout_workers, tensor_parallel_size),
            source=ZeroWeightSource(self.engine.module, gather=self.zero_stage == 3, copy=backend != "gloo"))

    def send_weights(self, version: int) -> None:
        """Send the current weights to every engine, which then serve them as `version` (all ranks)."""
        self.transfer.client.version = version
        self.transfer.send_weights()

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """DeepSpeed's own state (model, optimizer, scheduler), this rank's RNG state, plus an HF
        `save_pretrained` export (safetensors) under ckpt_dir/hf that transformers and vLLM load."""
        from transformers import AutoTokenizer

        self.engine.save_checkpoint(ckpt_dir, tag="deepspeed")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(ckpt_dir, f"rng_rank{self.rank}.pt"))
        state = self.full_state_dict()
        if self.rank == 0:
            hf_dir = os.path.join(ckpt_dir, "hf")
            self.engine.module.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(hf_dir)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(hf_dir)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """DeepSpeed's state and this rank's RNG state (dropout, sampling inside the learner). DeepSpeed
        unpickles its files: load only checkpoints calibrl wrote (README, "Security")."""
        self.engine.load_checkpoint(ckpt_dir, tag="deepspeed")
        path = os.path.join(ckpt_dir, f"rng_rank{self.rank}.pt")
        if os.path.exists(path):
            rng = torch.load(path, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    def barrier(self) -> int:
        import torch.distributed as dist

        dist.barrier()
        return self.rank


class ZeroWeightSource:
    """The learner's full HF-named weights as vLLM's `WeightSource` protocol (`metadata()` and a
    fresh iteration per round). Under ZeRO-3 every rank iterates in lockstep: each decoder layer's
    parameters are gathered together (one collective per layer, vLLM's `layerwise_groups`) and
    partitioned again after; with `copy` they are yielded as copies that outlive that (vLLM's packed
    NCCL producer holds several layers' tensors before it packs them; the gloo sender copies each
    into its bucket at once and needs none). The shm export's partitioned file does not apply here:
    on CPU the gloo transfer is bound by the engine's receive and reload, not by this gather
    (benchmarks/weight_sync.py), and this path is the NCCL one the CPU tests exercise."""

    def __init__(self, module: torch.nn.Module, *, gather: bool, copy: bool = True):
        from vllm.distributed.weight_transfer.base import layerwise_groups

        self.params = dict(module.named_parameters())
        self.groups = layerwise_groups(list(self.params))
        self.gather, self.copy = gather, copy

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                for group in self.groups for n, p in ((n, self.params[n]) for n in group)]

    def __iter__(self):
        import deepspeed

        for group in self.groups:
            with deepspeed.zero.GatheredParameters([self.params[n] for n in group], enabled=self.gather):
                for n in group:
                    p = self.params[n].detach()
                    yield n, p.clone() if self.gather and self.copy else p


def partitions(module: torch.nn.Module) -> list[Partition]:
    """This rank's ZeRO-3 partition of every parameter, in `named_parameters` order."""
    return [Partition(n, p.dtype, tuple(p.ds_shape), p.ds_tensor) for n, p in module.named_parameters()]


def write_partitioned(module: torch.nn.Module, path: str, rank: int) -> None:
    """(Every ZeRO-3 rank, one node) the module's full weights as one safetensors file at `path`:
    each rank writes its partitions into it at once (rank 0 the header too)."""
    import torch.distributed as dist

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_partitions(path, partitions(module), rank)
    dist.barrier()  # every rank's part is in


def all_on_one_node(world_size: int) -> bool:
    """(Every rank) whether all ranks of the process group run on this node."""
    if world_size == 1:
        return True
    import torch.distributed as dist

    from actors.group import node_address

    nodes = [None] * world_size
    dist.all_gather_object(nodes, node_address())
    return len(set(nodes)) == 1


def skip_shm_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op at
    `init_distributed`: a C++ build of about 45 s on the first learner start of every new
    environment (and a C++ compiler required), for `inference_all_reduce`, which training never
    calls. Marked incompatible, the op is skipped and collectives go through gloo as before."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def gather_rank_rows(results: list[dict[str, torch.Tensor]], key: str,
                     shape: tuple[int, int]) -> torch.Tensor:
    """Put each rank's `compute_logprobs` rows back in batch order."""
    out = torch.zeros(shape)
    for r in results:
        out[r["rows"]] = r[key]
    return out
