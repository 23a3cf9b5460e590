"""Configuration: dataclasses hold every default, YAML overrides them, `key=value` overrides YAML.

`load_config(yaml_path, overrides)` merges the three layers with OmegaConf structured configs
(an unknown key or a wrongly typed value is an error there) and `validate(cfg)` reports every
inconsistency between fields at once. Nothing here rewrites a value the user set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from calibrl.algo.losses import BASELINES, CALIB_WEIGHTS, LOSS_AGGS, NO_EXPERT_BASELINES
from calibrl.algo.methods import DEFAULT_METHOD, METHODS
from calibrl.algo.mixup import MIXUP_POLICIES


@dataclass
class ModelConfig:
    path: str = "runs/tiny-models/tiny-qwen2.5-vl"
    """Local directory of a Hugging Face checkpoint (config, tokenizer, safetensors). Never a hub name."""
    dtype: str = "float32"
    """Weights dtype for rollout and training: float32 on CPU, bfloat16 on GPU."""
    max_model_len: int = 1024
    """Context length in tokens given to vLLM; prompt + response must fit in it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs ~30% time)."""
    image_min_pixels: int = 28 * 28 * 4
    """Smallest image area (pixels) the VL processor resizes to."""
    image_max_pixels: int = 28 * 28 * 16
    """Largest image area (pixels) the VL processor resizes to."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["runs/demo-data/train.parquet"])
    """Parquet files of training prompts (calibrl schema or the reference implementation's)."""
    val_files: list[str] = field(default_factory=lambda: ["runs/demo-data/val.parquet"])
    """Parquet files evaluated every `trainer.eval_every_steps` and at the end."""
    expert_key: str = "solution"
    """Column holding expert chains of thought in reference-format files (calibrl files use `experts`)."""
    max_prompt_length: int = 512
    """Longest prompt in tokens (image tokens included); longer rows are bad rows."""
    max_images_per_prompt: int = 1
    """Most images in one prompt."""
    on_bad_row: str = "error"
    """`error`: stop at the first bad row naming file/row/field; `skip`: drop it and count it in the
    report."""
    read_batch_rows: int = 1024
    """Rows read from parquet at a time (large files are never read whole)."""
    shuffle: bool = True
    """Shuffle training prompts each epoch (seeded by trainer.seed and the epoch)."""


@dataclass
class RolloutConfig:
    num_workers: int = 1
    """Data-parallel vLLM engines, one Ray actor each."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism inside each worker (GPU only)."""
    samples_per_prompt: int = 8
    """On-policy responses sampled per prompt (n)."""
    max_response_length: int = 128
    """Longest sampled response in tokens."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling mass for training rollouts."""
    kv_cache_memory_mib: int = 256
    """KV-cache size per engine in MiB (on CPU vLLM would otherwise take most of RAM)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may use (GPU only)."""
    weight_sync: str = "auto"
    """Weight transport learner -> engines: vLLM's weight-transfer API over `nccl` (GPU) or `gloo`
    (CPU); `auto` picks by device; or `shm` (safetensors in /dev/shm + vLLM's reload_weights)."""
    num_cpus_per_worker: float = 1.0
    """Ray CPUs reserved per rollout actor."""
    num_gpus_per_worker: float = 0.0
    """Ray GPUs reserved per rollout actor where CUDA is present; 0: one per tensor-parallel rank. A
    fraction (e.g. 0.5 with `learner.num_gpus_per_learner: 0.5`) shares one GPU with a learner."""
    stream_chunk_prompts: int = 2
    """Prompts per rollout request: groups reach the calibration stage as each request completes."""


@dataclass
class VerifierConfig:
    num_workers: int = 1
    """Verifier actors scoring responses in parallel."""
    timeout_s: float = 5.0
    """Per-response time limit; a response over it gets reward 0 and is counted."""
    pass_threshold: float = 0.1
    """A response passes when reward > this (a format-only response fails)."""
    reward_function: str | None = None
    """Import path `module:function` of a custom reward fn(response, answer) -> float | Verdict."""
    num_cpus_per_worker: float = 0.5
    """Ray CPUs reserved per verifier actor."""


@dataclass
class AlgorithmConfig:
    name: str = DEFAULT_METHOD
    """A method of `calibrl.algo.methods.METHODS` (CalibRL or a baseline)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1 (eps_low)."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (eps_high; DAPO uses 0.28)."""
    clip_ratio_c: float = 3.0
    """Dual-clip bound c for negative advantages."""
    alpha: float = 0.5
    """Negative slope of the calibration LeakyReLU."""
    calibration_coef: float = 0.1
    """lambda: weight of the calibration term in the total loss."""
    baseline: str = "token"
    """Expert baseline: `token` (position-aligned expert log-prob) or `sequence` (expert mean)."""
    calib_weight: str = "abs_advantage"
    """Weight of each row's calibration term: `abs_advantage` (|A|, the paper) or `unit` (ablation)."""
    no_expert_baseline: str = "none"
    """Rows whose group dropped its expert: `none` (no calibration term) or `zero` (b_t = 0, the
    reference code's behaviour)."""
    std_normalize: bool = False
    """Divide group advantages by the group's reward std (GRPO); CalibRL does not."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    mixup: str = "random"
    """Whether a group keeps its expert row: random, pass, always, never."""
    mix_ratio: float = 1.0
    """Probability of keeping the expert under `mixup: random`."""
    pass_low: float = 0.0
    """Lower bound of the on-policy pass rate that keeps the expert under `mixup: pass`."""
    pass_high: float = 1.0
    """Upper bound of the on-policy pass rate that keeps the expert under `mixup: pass`."""
    expert_warmup_steps: int = 0
    """Steps at the start with no expert rows at all (pure GRPO warm-up)."""
    experts_per_group: int = 1
    """Expert trajectories attached to each group (pref_n)."""
    expert_choice: str = "first"
    """Which experts when a prompt has more than needed: `first` or `random`."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 in the paper)."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to the rollout policy (0 in the paper)."""
    dynamic_sampling: bool = False
    """Drop all-pass / all-fail groups and sample more prompts until the batch is full (DAPO)."""
    max_sampling_rounds: int = 4
    """Cap on rollout rounds per step under dynamic sampling."""
    overlong_buffer_tokens: int = 0
    """DAPO overlong shaping: penalty ramps over the last this-many tokens (0 = off)."""
    overlong_penalty: float = 1.0
    """DAPO overlong shaping: penalty at the maximum length."""


@dataclass
class LearnerConfig:
    num_learners: int = 1
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    zero_stage: int = 2
    """ZeRO stage (2 or 3)."""
    lr: float = 1e-6
    """Peak learning rate."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps of the learning rate."""
    lr_schedule: str = "constant"
    """`constant` or `cosine` after the warm-up."""
    weight_decay: float = 0.0
    """Weight decay."""
    optimizer: str = "adamw"
    """`adamw` (default) or `sgd` (an update proportional to the gradient; used by equivalence tests)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    compile_loss: bool | None = None
    """Fuse each whole policy loss (the GRPO family's and CalibRL's; the PG part of LUFFY's and RL-PLUS's)
    into one loop with `torch.compile` (needs a C++ compiler on CPU, Triton on GPU). A learner process
    pays for compiling at its first update: 3-13 s on the 2-core CPU machine (README, Performance).
    null (the default): on CUDA learners, where eager mode launches a kernel per op; not on CPU ones,
    where a small run never earns the compile time back. false: the same functions run eagerly.
    Where the compiler fails, the loss warns once and runs eagerly."""
    pad_to_multiple_of: int | None = None
    """Pad each training batch's response length on the right to a multiple of this (masked tokens:
    losses and metrics unchanged). A compiled loss is told the length is such a multiple, which lets
    its GPU kernels load four tokens at a time instead of one (`calibrl.algo.compile_loss_kernels`;
    Triton's hint is divisibility by 16, so a multiple of 16 is what helps). null (the default): 16
    where the loss is compiled on CUDA, else 1 (no padding)."""
    mini_batch_prompts: int = 4
    """Prompts per optimizer update (PPO mini-batch); prompts_per_step must be a multiple."""
    micro_batch_per_device: int = 4
    """Sequences per forward/backward on one rank (gradient accumulation inside a mini-batch)."""
    ppo_epochs: int = 1
    """Passes over each step's batch."""
    num_gpus_per_learner: float = 1.0
    """Ray GPUs reserved per learner where CUDA is present (a fraction shares a GPU with an engine)."""
    num_cpus_per_learner: float = 1.0
    """Ray CPUs reserved per learner actor."""
    sft_lr: float | None = None
    """Learning rate during SFT warm-up steps (None: `lr`)."""
    reset_optimizer_after_sft: bool = True
    """Zero the optimizer's moments when the SFT warm-up ends, so RL starts as a fresh run would (with
    SFT's far larger gradients in Adam's second moment, RL updates would be orders of magnitude smaller
    than `lr`)."""


@dataclass
class TrainerConfig:
    total_steps: int = 20
    """RL steps (one rollout batch and its updates each)."""
    prompts_per_step: int = 8
    """Prompts sampled per step."""
    sft_warmup_steps: int = 0
    """SFT steps on expert trajectories before RL (SFT->GRPO baseline, demo warm start)."""
    sft_batch_prompts: int = 16
    """Prompts per SFT step (the warm-up, and every step of the `sft` baseline)."""
    output_dir: str = "runs/calibrl"
    """Run directory: metrics, TensorBoard, checkpoints, report."""
    resume: str = "auto"
    """`auto` (latest checkpoint in output_dir if any), `never`, or a checkpoint path."""
    save_every_steps: int = 10
    """Checkpoint period in steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are pruned."""
    eval_every_steps: int = 10
    """Validation period in steps (0 = only at the end)."""
    eval_pass_k: int = 4
    """k of pass@k at validation (sampled at rollout temperature)."""
    eval_max_prompts: int = 64
    """Validation prompts per val file (0 = all)."""
    one_step_off: bool = False
    """Sample step t+1 while the learner trains step t (its samples are then 1 version old); while the
    driver waits on the learners, it verifies step t+1's finished chunks and adds their groups."""
    stream_logprobs: bool = True
    """Compute the old log-probs of each chunk's groups on the learners as the chunk is verified,
    while the rest of the step generates (not under dynamic sampling, whose groups are only known at
    the end). Off: one pass over the whole batch after generation."""
    max_staleness: int = 1
    """Oldest weights a trained sample may come from, in versions behind the learner's: one-step-off
    needs 1; a sample older than this stops the run naming the engine."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    ray_address: str | None = None
    """Ray cluster to join (None: the running cluster if any, else a local one)."""
    log_level: str = "info"
    """`info`: the console shows calibrl's progress and every actor's warnings and errors, third-party
    output goes to `output_dir/logs/{actor}.log`; `debug` (`--verbose`): everything on the console."""


LOG_LEVELS = ("info", "debug")
WEIGHT_SYNCS = ("auto", "nccl", "gloo", "shm")


@dataclass
class ReliabilityConfig:
    """How a run survives lost actors and hangs: every wait on an actor has a deadline; stateless
    roles (rollout engines, verifiers, the expert store) are restarted by Ray and their work resent;
    a lost learner rank stops the run with a message (resume with `trainer.resume=auto`)."""

    actor_restarts: int = 20
    """Restarts Ray grants each rollout engine, verifier and the expert store over a run."""
    rollout_timeout_s: float = 900.0
    """Longest a chunk of rollout requests may take; past it the engine counts as hung and is replaced."""
    verify_timeout_s: float = 300.0
    """Longest a verifier may take over one chunk; past it the chunk goes to another verifier."""
    logprobs_timeout_s: float = 1800.0
    """Longest the learners' old-log-prob pass may take before the run stops naming them."""
    train_timeout_s: float = 3600.0
    """Longest the learners' update may take before the run stops naming them."""
    sync_timeout_s: float = 300.0
    """Longest a weight push may take (also the transfer group's collective timeout: an engine left
    waiting by a push that broke off is free again after it)."""
    restart_timeout_s: float = 600.0
    """Longest a restarted engine may take to come back (vLLM start-up included)."""
    max_nonfinite_updates: int = 3
    """Updates in a row skipped for a non-finite loss or gradient before the run stops."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)


class ConfigError(ValueError):
    """One or more configuration inconsistencies; `.problems` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def check_paths(cfg: Config) -> None:
    """Raise `ConfigError` naming every input that is not where the config says: the model directory
    (with its config.json and weights) and the data files. Run before anything starts."""
    m, d = cfg.model, cfg.data
    problems = []
    if not os.path.isdir(m.path):
        problems.append(f"model.path={m.path!r}: no such directory (a local model directory; nothing is "
                        "downloaded)")
    elif not os.path.isfile(os.path.join(m.path, "config.json")):
        problems.append(f"model.path={m.path!r}: no config.json there (not a transformers model directory)")
    elif not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(m.path)):
        problems.append(f"model.path={m.path!r}: no weights there (*.safetensors or *.bin)")
    for key, files in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        problems += [f"{key}[{i}]={f!r}: no such file" for i, f in enumerate(files) if not os.path.isfile(f)]
    if problems:
        raise ConfigError(problems)


def load_config(yaml_paths: str | list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file(s), in order <- `key=value` overrides; returns a typed `Config` (not
    validated). A missing or broken file, an unknown key or a value of the wrong type raises one
    `ConfigError` naming the file or override and the key (with a did-you-mean for keys)."""
    merged = OmegaConf.structured(Config)
    for path in [yaml_paths] if isinstance(yaml_paths, str) else (yaml_paths or []):
        merged = _merge(merged, _load_yaml(path), f"in {path}")
    for item in overrides or []:
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"in the override {item!r}")
    return OmegaConf.to_object(merged)


def _load_yaml(path: str):
    import yaml

    if not os.path.isfile(path):
        raise ConfigError([f"{path}: no such config file"])
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}"]) from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError([f"{path}: expected a mapping of sections (model:, data:, ...) at the top"])
    return loaded


def config_keys(cls=None, prefix: str = "") -> list[str]:
    """Every settable key, dotted (`learner.lr`, ...)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                    else None):
            out += config_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _merge(base, layer, source: str):
    import difflib

    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        key = e.full_key or "?"
        close = difflib.get_close_matches(key, config_keys(), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError([f"unknown key {key} ({source}){hint}"]) from None
    except ValidationError as e:
        what = (e.msg or str(e)).splitlines()[0]
        raise ConfigError([f"{e.full_key or 'a section'}: {what} ({source})"]) from None


def split_config_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments as (YAML paths in order, key=value overrides); anything else is an error."""
    configs = [a for a in args if a.endswith((".yaml", ".yml"))]
    overrides = [a for a in args if "=" in a and not a.endswith((".yaml", ".yml"))]
    unknown = [a for a in args if a not in configs and a not in overrides]
    if unknown:
        raise SystemExit(f"calibrl: expected CONFIG.yaml files and key=value overrides, got {unknown}")
    return configs, overrides


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_context_length(model_path: str) -> int | None:
    """max_position_embeddings from a local checkpoint's config.json (None if absent)."""
    p = os.path.join(model_path, "config.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        hf = json.load(f)
    text = hf.get("text_config", hf)
    return text.get("max_position_embeddings", hf.get("max_position_embeddings"))


def validate(cfg: Config) -> Config:
    """Raise `ConfigError` listing every inconsistency; return cfg unchanged when there is none."""
    a, d, r, ln, t, m = cfg.algorithm, cfg.data, cfg.rollout, cfg.learner, cfg.trainer, cfg.model
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(a.name in METHODS, f"algorithm.name={a.name!r} is unknown; choose one of {', '.join(METHODS)}")
    need(a.loss_agg in LOSS_AGGS,
         f"algorithm.loss_agg={a.loss_agg!r} is unknown; choose one of {', '.join(LOSS_AGGS)}")
    need(a.mixup in MIXUP_POLICIES,
         f"algorithm.mixup={a.mixup!r} is unknown; choose one of {', '.join(MIXUP_POLICIES)}")
    need(a.baseline in BASELINES, f"algorithm.baseline={a.baseline!r} is unknown; choose token or sequence")
    need(a.calib_weight in CALIB_WEIGHTS, f"algorithm.calib_weight={a.calib_weight!r}: choose one of "
         f"{', '.join(CALIB_WEIGHTS)}")
    need(a.no_expert_baseline in NO_EXPERT_BASELINES,
         f"algorithm.no_expert_baseline={a.no_expert_baseline!r}: "
         f"choose one of {', '.join(NO_EXPERT_BASELINES)}")
    need(0.0 <= a.alpha <= 1.0, f"algorithm.alpha={a.alpha} must lie in [0, 1] (0: ReLU, 1: identity)")
    need(a.expert_choice in ("first", "random"),
         f"algorithm.expert_choice={a.expert_choice!r}: use first or random")
    need(0.0 <= a.mix_ratio <= 1.0, f"algorithm.mix_ratio={a.mix_ratio} must lie in [0, 1]")
    need(a.pass_low <= a.pass_high,
         f"algorithm.pass_low={a.pass_low} exceeds algorithm.pass_high={a.pass_high}")
    need(a.clip_low >= 0 and a.clip_high >= 0, "algorithm.clip_low and clip_high must be >= 0")
    need(a.clip_ratio_c > 1.0, f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1 (dual clip)")
    need(a.experts_per_group >= 1, f"algorithm.experts_per_group={a.experts_per_group} must be >= 1")
    need(d.on_bad_row in ("error", "skip"), f"data.on_bad_row={d.on_bad_row!r}: use error or skip")
    need(len(d.train_files) > 0, "data.train_files is empty (prompts and expert trajectories come from it)")
    need(r.weight_sync in WEIGHT_SYNCS,
         f"rollout.weight_sync={r.weight_sync!r}: choose one of {', '.join(WEIGHT_SYNCS)}")
    need(r.weight_sync != "gloo" or r.tensor_parallel_size == 1,
         "rollout.weight_sync=gloo needs rollout.tensor_parallel_size=1 (the engine must run in the "
         "rollout actor's process); use nccl on GPU")
    need(t.max_staleness >= 0, f"trainer.max_staleness={t.max_staleness} must be >= 0")
    need(not t.one_step_off or t.max_staleness >= 1,
         f"trainer.one_step_off samples with weights 1 version old: it needs trainer.max_staleness >= 1 "
         f"(got {t.max_staleness})")
    need(ln.zero_stage in (0, 1, 2, 3), f"learner.zero_stage={ln.zero_stage} must be 0, 1, 2 or 3")
    need(ln.optimizer in ("adamw", "sgd"), f"learner.optimizer={ln.optimizer!r}: adamw or sgd")
    need(ln.lr_schedule in ("constant", "cosine"),
         f"learner.lr_schedule={ln.lr_schedule!r}: constant or cosine")
    need(t.log_level in LOG_LEVELS,
         f"trainer.log_level={t.log_level!r} is unknown; choose one of {', '.join(LOG_LEVELS)}")
    need(t.resume in ("auto", "never") or os.path.exists(t.resume),
         f"trainer.resume={t.resume!r} is neither auto, never nor an existing checkpoint path")

    samples = a.name not in METHODS or METHODS[a.name].needs_rollouts
    need(not samples or r.samples_per_prompt >= 2,
         f"rollout.samples_per_prompt={r.samples_per_prompt}: group advantages need >= 2 samples per prompt")
    need(ln.pad_to_multiple_of is None or ln.pad_to_multiple_of >= 1,
         f"learner.pad_to_multiple_of={ln.pad_to_multiple_of} must be >= 1 (or null)")
    for name, value in [("trainer.prompts_per_step", t.prompts_per_step),
                        ("learner.mini_batch_prompts", ln.mini_batch_prompts),
                        ("learner.micro_batch_per_device", ln.micro_batch_per_device),
                        ("learner.num_learners", ln.num_learners), ("rollout.num_workers", r.num_workers),
                        ("verifier.num_workers", cfg.verifier.num_workers),
                        ("trainer.total_steps", t.total_steps)]:
        need(value >= 1, f"{name}={value} must be >= 1")
    if t.prompts_per_step >= 1 and ln.mini_batch_prompts >= 1:
        need(t.prompts_per_step % ln.mini_batch_prompts == 0,
             f"learner.mini_batch_prompts={ln.mini_batch_prompts} does not divide "
             f"trainer.prompts_per_step={t.prompts_per_step}")
        seqs = ln.mini_batch_prompts * r.samples_per_prompt
        if ln.num_learners >= 1 and ln.micro_batch_per_device >= 1:
            need(seqs % ln.num_learners == 0,
                 f"a mini-batch of {seqs} on-policy sequences (mini_batch_prompts x samples_per_prompt) "
                 f"does not split over learner.num_learners={ln.num_learners}")
            per_rank = seqs // max(ln.num_learners, 1)
            need(per_rank % ln.micro_batch_per_device == 0,
                 f"learner.micro_batch_per_device={ln.micro_batch_per_device} does not divide the "
                 f"{per_rank} on-policy sequences each rank gets per mini-batch")
    need(d.max_prompt_length + r.max_response_length <= m.max_model_len,
         f"data.max_prompt_length ({d.max_prompt_length}) + rollout.max_response_length "
         f"({r.max_response_length}) exceeds model.max_model_len ({m.max_model_len})")
    ctx = model_context_length(m.path)
    need(ctx is None or m.max_model_len <= ctx,
         f"model.max_model_len={m.max_model_len} exceeds the model's context ({ctx} tokens, "
         f"{m.path}/config.json)")
    if problems:
        raise ConfigError(problems)
    return cfg
