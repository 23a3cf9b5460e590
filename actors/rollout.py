"""Rollout worker: one vLLM engine per actor (`rollout-0`, `rollout-1`, ...).

The class is plain Python; `RolloutWorker.from_config(cfg)` starts the run's engines as named Ray
actors (every role has the same constructor: `VerifierPool.from_config`, `ExpertStore.from_config`,
`Learner.from_config`). The engine runs inside the actor
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless tensor parallelism needs vLLM's own workers.

Weights arrive in place, without restarting the engine, through one of two transports
(actors/weight_sync.py):
- vLLM's RL weight-transfer API (`weight_sync` `nccl` on GPU, `gloo` on CPU; `weight_transfer_config`
  selects the engine): the learner's rank 0 broadcasts over a process group that includes every
  engine, driven through `init_weight_transfer_engine`, `start_weight_update`, `update_weights`
  and `finish_weight_update(version)`;
- `shm`: the learner writes a safetensors file to /dev/shm and every worker calls vLLM's
  `reload_weights` on it.
Every result carries the weights version the engine served it with.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from actors.group import named_actor
from actors.logs import actor_log_dir
from actors.weight_sync import weight_sync_backend
from calibrl.algo import Response
from calibrl.config import Config
from calibrl.inputs import decode_images, render_chat
from calibrl.modeling import NEVER_SAMPLED_BIAS, never_sampled_token_ids


@dataclass
class RolloutRequest:
    """One prompt to sample `n` responses for."""

    prompt_id: str
    prompt: str
    """Text with `<image>` placeholders (rendered with the model's chat template by the worker)."""
    images: list[bytes] = field(default_factory=list)
    seed: int | None = None
    """Sampling seed for this prompt (the driver derives it from the run seed, step and prompt)."""


@dataclass
class SamplingSpec:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128


@dataclass
class RolloutResult:
    prompt_id: str
    prompt_token_ids: list[int]
    """The prompt as the engine saw it, image tokens expanded (the learner reuses these ids)."""
    samples: list[Response]


def is_vision_language(model_path: str) -> bool:
    with open(os.path.join(model_path, "config.json")) as f:
        return "vision_config" in json.load(f)


class RolloutWorker:
    def __init__(self, *, model_path: str, dtype: str = "float32", max_model_len: int = 1024,
                 kv_cache_memory_mib: int = 256, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_images_per_prompt: int = 1,
                 image_min_pixels: int = 28 * 28 * 4, image_max_pixels: int = 28 * 28 * 16,
                 weight_sync: str = "shm", seed: int = 0):
        if tensor_parallel_size == 1:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        t0 = time.time()
        kwargs: dict = {"model": model_path, "dtype": dtype, "max_model_len": max_model_len, "seed": seed,
                            "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": True,
                            "use_tqdm_on_load": False,
                            # log-probs of the distribution sampled from (after temperature), which
                            # is the one the learner recomputes
                            "logprobs_mode": "processed_logprobs"}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # never vLLM's CPU default of most of the RAM
            kwargs.update(kv_cache_memory_bytes=kv_cache_memory_mib * 1024**2, enforce_eager=True)
        if is_vision_language(model_path):
            kwargs.update(limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
                          mm_processor_kwargs={"min_pixels": image_min_pixels,
                                               "max_pixels": image_max_pixels})
        if weight_sync == "gloo":
            from actors.gloo_transfer import register

            register()  # the engine runs in this process (no tensor parallelism on CPU)
        if weight_sync in ("nccl", "gloo"):
            kwargs["weight_transfer_config"] = {"backend": weight_sync}
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        # A sampled image/video placeholder token would make the learner's input ill-formed (its
        # count must equal the image features'); the engine never samples one.
        self.logit_bias = {t: NEVER_SAMPLED_BIAS
                           for t in never_sampled_token_ids(self.llm.llm_engine.model_config.hf_config)}
        self.weights_version = 0
        self.updating = False  # inside a weight-transfer update (start .. finish)
        self.startup_s = time.time() - t0

    @classmethod
    def from_config(cls, cfg: Config, *, name_prefix: str = "rollout", model_path: str | None = None) -> list:
        """The run's `rollout.num_workers` engines, actors `{name_prefix}-0..`, from `cfg` (a GPU
        per tensor-parallel rank where CUDA is present). `model_path` overrides `cfg.model.path`."""
        import torch

        r, m = cfg.rollout, cfg.model
        gpus = (r.num_gpus_per_worker or r.tensor_parallel_size) if torch.cuda.is_available() else 0
        return [named_actor(cls, f"{name_prefix}-{i}", num_cpus=r.num_cpus_per_worker, num_gpus=gpus,
                            max_restarts=cfg.reliability.actor_restarts,
                            model_path=model_path or m.path, dtype=m.dtype, max_model_len=m.max_model_len,
                            kv_cache_memory_mib=r.kv_cache_memory_mib,
                            tensor_parallel_size=r.tensor_parallel_size,
                            gpu_memory_utilization=r.gpu_memory_utilization,
                            max_images_per_prompt=cfg.data.max_images_per_prompt,
                            image_min_pixels=m.image_min_pixels, image_max_pixels=m.image_max_pixels,
                            weight_sync=weight_sync_backend(r.weight_sync), seed=cfg.trainer.seed + i,
                            log_dir=actor_log_dir(cfg))
                for i in range(r.num_workers)]

    # ---- sampling -------------------------------------------------------------------------

    def generate(self, requests: list[RolloutRequest], sampling: SamplingSpec) -> list[RolloutResult]:
        """Sample `sampling.n` responses per request; temperature 0 is greedy."""
        import torch
        from vllm import SamplingParams

        # Per-request seeds work on CUDA; vLLM's CPU sampler rejects them (its generator has no
        # offset), so there the engine's generator (in this process) is reseeded for the call.
        per_request_seed = torch.cuda.is_available()
        if not per_request_seed and requests and requests[0].seed is not None:
            torch.manual_seed(requests[0].seed)
        prompts, params = [], []
        for r in requests:
            p: dict = {"prompt": render_chat(self.tokenizer, r.prompt)}
            if r.images:
                p["multi_modal_data"] = {"image": decode_images(r.images)}
            prompts.append(p)
            params.append(SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_tokens=sampling.max_tokens, logprobs=0,
                                         seed=r.seed if per_request_seed else None,
                                         logit_bias=self.logit_bias or None))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        version = self.weights_version
        return [
            RolloutResult(
                prompt_id=r.prompt_id,
                prompt_token_ids=list(out.prompt_token_ids),
                # numpy arrays travel through Ray's object store without a copy and feed the
                # calibration stage without a per-element conversion
                samples=[Response(token_ids=np.asarray(c.token_ids, dtype=np.int64),
                                       logprobs=np.asarray([lp[t].logprob
                                                            for t, lp in zip(c.token_ids, c.logprobs)],
                                                           dtype=np.float32),
                                       text=c.text, finish_reason=str(c.finish_reason),
                                       weights_version=version)
                         for c in out.outputs])
            for r, out in zip(requests, outputs)
        ]

    # ---- weight sync: shared-memory safetensors --------------------------------------------

    def load_weights_from_path(self, version: int, weights_path: str) -> float:
        """Load the full HF-named state dict saved under `weights_path` in place; returns seconds."""
        t0 = time.time()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_path})
        self._forget_old_weights()
        self.weights_version = version
        return time.time() - t0

    # ---- weight sync: vLLM's weight-transfer API (nccl on GPU, gloo on CPU) -----------------------
    # The control plane of actors.weight_sync.EngineClient: each forwards to the engine's workers.

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._close_interrupted_update()
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self) -> None:
        self._close_interrupted_update()
        self.llm.collective_rpc("start_weight_update")
        self.updating = True

    def update_weights(self, update_info: dict) -> None:
        self.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, version: int | None = None) -> int:
        """Apply the received weights and serve them as `version`; returns the version served."""
        self.llm.collective_rpc("finish_weight_update")
        self.updating = False
        self._forget_old_weights()
        if version is not None:
            self.weights_version = version
        return self.weights_version

    def _close_interrupted_update(self) -> None:
        """A push that broke off (another engine died mid-transfer) left this engine inside an update:
        close it (layers not received keep their weights) before the driver pushes again; the engine
        serves no sample until that push completes."""
        if self.updating:
            self.llm.collective_rpc("finish_weight_update")
            self.updating = False

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    def _forget_old_weights(self) -> None:
        """Drop what was computed with the old weights: cached KV and, for a VL model, the cached
        vision-encoder outputs, in the scheduler and the model runner together (resetting only the
        runner's, as `reload_weights` does, leaves the scheduler counting on entries that are gone:
        "Encoder cache miss")."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    # ---- introspection ----------------------------------------------------------------------

    def info(self) -> dict:
        return {"weights_version": self.weights_version, "startup_s": round(self.startup_s, 2),
                "pid": os.getpid()}
