"""The method table: every training method calibrl runs, described once (docs/algorithm.md, sections
3-6 and "Baselines on the same pipeline").

`METHODS[name]` says which batch-level loss a method uses and which knobs that loss reads, which
rows the loss averages over, whether groups carry expert rows, whether the expert counts in the
group baseline, and whether the method samples on-policy responses at all. Config validation,
the calibration stage set-up and the driver read this table; adding a baseline or an ablation is
one entry here (plus, for a new loss, its tensor function in `losses.py`).

The methods that share `ppo_loss` (grpo, drgrpo, dapo, sft_grpo) differ only in configuration
(advantage normalisation, aggregation, clip_high, dynamic sampling): see configs/baselines/.

`compute_loss` is the learner's entry: the method's loss plus the optional k3 KL penalty and
entropy bonus, over the method's loss tokens, with the mini-batch's global normalisers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from calibrl.algo.losses import agg_loss, calibrl_loss, k3_kl, luffy_loss, ppo_loss, rlplus_loss, sft_loss


class LossBatch(Protocol):
    """The `TrainBatch` fields the losses read."""

    old_logp: Tensor
    expert_old_logp: Tensor
    expert_mean_logp: Tensor
    response_mask: Tensor
    advantages: Tensor
    is_expert: Tensor
    passed: Tensor
    has_expert: Tensor


# ---- batch-level adapters: each takes only the knobs its loss uses (and agg + normalisers) --------


Out = tuple[Tensor, dict[str, Tensor]]


def _calibrl(logp: Tensor, batch: LossBatch, *, clip_low: float = 0.2, clip_high: float = 0.2,
             clip_ratio_c: float = 3.0, alpha: float = 0.5, lam: float = 0.1, baseline: str = "token",
             diagnostics: bool = False, calib_weight: str = "abs_advantage", no_expert_baseline: str = "none",
             **norms) -> Out:
    return calibrl_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert,
                        batch.passed, batch.expert_old_logp, clip_low=clip_low, clip_high=clip_high,
                        clip_ratio_c=clip_ratio_c, alpha=alpha, lam=lam, baseline=baseline,
                        expert_mean_logp=batch.expert_mean_logp, has_expert=batch.has_expert,
                        diagnostics=diagnostics, calib_weight=calib_weight,
                        no_expert_baseline=no_expert_baseline, **norms)


def _ppo(logp: Tensor, batch: LossBatch, *, clip_low: float = 0.2, clip_high: float = 0.2,
         clip_ratio_c: float = 3.0, diagnostics: bool = False, **norms) -> Out:
    return ppo_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert,
                    clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                    diagnostics=diagnostics, **norms)


def _sft(logp: Tensor, batch: LossBatch, **norms) -> Out:
    return sft_loss(logp, batch.response_mask, batch.is_expert, **norms)


def _luffy(logp: Tensor, batch: LossBatch, *, clip_low: float = 0.2, clip_high: float = 0.2,
           clip_ratio_c: float = 3.0, **norms) -> Out:
    return luffy_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert,
                      clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, **norms)


def _rlplus(logp: Tensor, batch: LossBatch, *, clip_low: float = 0.2, clip_high: float = 0.2,
            clip_ratio_c: float = 3.0, **norms) -> Out:
    return rlplus_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert,
                       clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, **norms)


PolicyLoss = Callable[..., Out]
PPO_KNOBS = ("clip_low", "clip_high", "clip_ratio_c")
LOSS_ROWS = ("on_policy", "expert", "all")


@dataclass(frozen=True)
class Method:
    loss: PolicyLoss
    """fn(logp (B, T), batch, *, <knobs>, agg, global_tokens, global_seqs, norm_length) -> (loss, metrics)."""
    knobs: tuple[str, ...]
    """The loss's own keyword arguments (`compute_loss` passes these and drops the others)."""
    loss_rows: str
    """Rows the loss averages over: `on_policy`, `expert` or `all`."""
    expert_rows: bool
    """Groups carry expert rows, as the mixup policy decides; False: never (pure on-policy RL)."""
    expert_in_baseline: bool = False
    """The expert's reward joins the group baseline of the advantages (LUFFY, RL-PLUS)."""
    needs_rollouts: bool = True
    """Samples on-policy responses; False: trains on expert trajectories only (SFT)."""


METHODS: dict[str, Method] = {
    "calibrl": Method(_calibrl, (*PPO_KNOBS, "diagnostics", "alpha", "lam", "baseline", "calib_weight",
                                 "no_expert_baseline"), "on_policy", expert_rows=True),
    "grpo": Method(_ppo, (*PPO_KNOBS, "diagnostics"), "on_policy", expert_rows=False),
    "drgrpo": Method(_ppo, (*PPO_KNOBS, "diagnostics"), "on_policy", expert_rows=False),
    "dapo": Method(_ppo, (*PPO_KNOBS, "diagnostics"), "on_policy", expert_rows=False),
    # after SFT warm-up
    "sft_grpo": Method(_ppo, (*PPO_KNOBS, "diagnostics"), "on_policy", expert_rows=False),
    "sft": Method(_sft, (), "expert", expert_rows=True, needs_rollouts=False),
    "luffy": Method(_luffy, PPO_KNOBS, "all", expert_rows=True, expert_in_baseline=True),
    "rlplus": Method(_rlplus, PPO_KNOBS, "all", expert_rows=True, expert_in_baseline=True),
}
DEFAULT_METHOD = "calibrl"
SFT_WARMUP_METHOD = "sft"
"""The loss of `trainer.sft_warmup_steps` (cross-entropy on experts), whatever the RL method."""
ALL_KNOBS = frozenset(k for m in METHODS.values() for k in m.knobs)


def has_signal(name: str, batch: LossBatch, *, entropy_coef: float = 0.0, kl_coef: float = 0.0) -> bool:
    """False when method `name`'s loss has a zero gradient on `batch` whatever the weights: an RL
    loss whose rows all have advantage 0 (every group all-pass or all-fail) and no entropy or KL
    term. The learner takes no optimizer step then: Adam would still move every weight by its
    momentum, with nothing to learn from."""
    if METHODS[name].loss_rows == "expert" or entropy_coef > 0 or kl_coef > 0:
        return True
    rows = loss_token_mask(name, batch).any(-1)
    return bool((batch.advantages[rows] != 0).any())


def loss_token_mask(name: str, batch: LossBatch) -> Tensor:
    """(B, T) bool: the tokens the loss of method `name` averages over."""
    rows = METHODS[name].loss_rows
    if rows == "all":
        return batch.response_mask
    selected = batch.is_expert if rows == "expert" else ~batch.is_expert
    return batch.response_mask & selected.unsqueeze(-1)


def loss_normalizers(name: str, batch: LossBatch) -> dict[str, float]:
    """{"global_tokens", "global_seqs"} of method `name`'s loss over `batch` (call it on the whole
    mini-batch before splitting; under data parallelism sum these counts over the ranks' shards)."""
    mask = loss_token_mask(name, batch)
    return {"global_tokens": float(mask.sum()), "global_seqs": float(mask.any(-1).sum())}


def compute_loss(name: str, logp: Tensor, batch: LossBatch, *, agg: str = "token-mean",
                 entropy: Tensor | None = None, entropy_coef: float = 0.0, kl_coef: float = 0.0,
                 global_tokens: float | None = None, global_seqs: float | None = None,
                 norm_length: int | None = None, **knobs) -> Out:
    """The learner's entry: METHODS[name].loss + kl_coef * agg(k3 KL to old_logp)
    - entropy_coef * agg(entropy), all over `loss_token_mask(name, batch)` with the same normalisers.

    logp: (B, T) current log-probs of batch.response_ids; entropy: (B, T) (needed when
    entropy_coef > 0; logged as `entropy` when given). `knobs`: any of `ALL_KNOBS` (clip_low,
    alpha, lam, ...); the method's loss gets the ones it reads, a name no method reads is an error.
    Returns (loss, metrics incl. "loss").
    """
    unknown = set(knobs) - ALL_KNOBS
    if unknown:
        raise TypeError(f"compute_loss: unknown loss knobs {sorted(unknown)}; known: {sorted(ALL_KNOBS)}")
    method = METHODS[name]
    norms = {"agg": agg, "global_tokens": global_tokens, "global_seqs": global_seqs,
             "norm_length": norm_length}
    own = {k: v for k, v in knobs.items() if k in method.knobs}
    loss, metrics = method.loss(logp, batch, **own, **norms)
    mask = loss_token_mask(name, batch)
    if kl_coef > 0:
        kl = agg_loss(k3_kl(logp, batch.old_logp), mask, **norms)
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = kl.detach()
    if entropy is not None:
        ent = agg_loss(entropy, mask, **norms)
        if entropy_coef > 0:
            loss = loss - entropy_coef * ent
        metrics["entropy"] = ent.detach()
    elif entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs the per-token entropy")
    metrics["loss"] = loss.detach()
    return loss, metrics
