"""Sections 3-5 of docs/algorithm.md (dual-clip policy gradient, calibration term with the expert as
baseline, total loss) and the baselines' policy losses (GRPO, Dr.GRPO, DAPO, SFT, LUFFY, RL-PLUS).

Two layers:
- tensor functions (`calibrl_loss`, `ppo_loss`, `sft_loss`, `luffy_loss`, `rlplus_loss`,
  `agg_loss`, `dual_clip_pg`, `calibration_term`) take (B, T) / (B,) tensors and numbers as
  keywords; anyone with their own trainer can call them;
- batch-level adapters and `compute_loss` live in `calibrl.algo.methods`, whose `METHODS` table
  says which loss each method uses and which rows it averages over.

Normalisers. Every loss takes `global_tokens` (token-mean) and `global_seqs` (seq-mean-*): the
number of loss tokens / loss sequences in the whole (mini-)batch, counted by `loss_normalizers`.
With them, a micro-batch or data-parallel shard returns its share of the whole-batch loss: the
shares sum to the whole-batch loss and their gradients sum to its gradient (under DDP/ZeRO, whose
all-reduce averages gradients, scale each rank's loss by the world size). None means "this
call's own count". Metrics are detached 0-d tensors (no device sync); `*_loss` metrics and the
token fractions use the same normalisers, so they too add up over micro-batches and shards.

Departures from the paper / reference code:
- The calibration term only acts on on-policy rows whose group kept an expert (`has_expert`); a
  group whose expert the mixup policy dropped trains like GRPO (in the reference code such rows
  would see b_t = 0). The term is still averaged over all on-policy tokens, like the PG term.
- `seq-mean-token-sum-norm` (Dr.GRPO) divides the summed token losses by `norm_length` (pass the
  rollout's max response length; default the padded T) and by the number of sequences.
- grpo, drgrpo, dapo and sft_grpo share `ppo_loss`; as published they differ in the config:
  grpo std_normalize, token-mean; drgrpo no std, seq-mean-token-sum-norm; dapo std_normalize,
  token-mean, clip_high 0.28, dynamic_sampling, overlong shaping. LUFFY and RL-PLUS count the
  expert in the group baseline (the calibration stage's `expert_in_baseline=True`).
- LUFFY's expert-token weight f(p) = p / (p + 0.1) and RL-PLUS's weight are unclipped and apply
  to expert rows only; RL-PLUS's (1 - p)^0.5 focus factor is detached, as in its paper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BASELINES = ("token", "sequence")
CALIB_WEIGHTS = ("abs_advantage", "unit")
NO_EXPERT_BASELINES = ("none", "zero")
"""Expert baselines of the calibration term: position-aligned token log-probs, or the expert's mean."""


# ---------------------------------------------------------------------------------------------
# aggregation


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) as one dot product (no (B, T) temporary). x, mask: (B, T) same dtype."""
    return torch.dot(x.reshape(-1), mask.reshape(-1))


def _row_sums(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row sum(x * mask): (B, T), (B, T) -> (B,)."""
    return torch.bmm(x.unsqueeze(1), mask.unsqueeze(2)).reshape(-1)


def agg_loss(loss_mat: Tensor, mask: Tensor, *, agg: str = "token-mean", global_tokens: float | None = None,
             global_seqs: float | None = None, norm_length: int | None = None) -> Tensor:
    """Section 5's agg over the tokens where `mask` is set.

    loss_mat: (B, T) float; mask: (B, T) bool or float. Modes:
    - token-mean: sum / global_tokens (default: this call's mask count);
    - seq-mean-token-mean: sum over sequences of (the sequence's token mean) / global_seqs;
    - seq-mean-token-sum: sum / global_seqs;
    - seq-mean-token-sum-norm: sum / (norm_length or T) / global_seqs (Dr.GRPO).
    global_seqs defaults to the number of rows with at least one masked token. Returns a 0-d tensor.
    """
    mask = mask.to(loss_mat.dtype)
    if agg == "token-mean":
        denom = global_tokens if global_tokens is not None else mask.sum().clamp(min=1)
        return _masked_sum(loss_mat, mask) / denom
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {', '.join(LOSS_AGGS)}")
    seqs = global_seqs if global_seqs is not None else (mask.sum(-1) > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (_row_sums(loss_mat, mask) / mask.sum(-1).clamp(min=1)).sum() / seqs
    total = _masked_sum(loss_mat, mask)
    if agg == "seq-mean-token-sum":
        return total / seqs
    return total / (norm_length or loss_mat.shape[-1]) / seqs


def _or(global_count: float | None, local_count: Tensor) -> Tensor | float:
    """The global normaliser when given, else this call's count (at least 1)."""
    return global_count if global_count is not None else local_count.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# per-token terms


class _PG(NamedTuple):
    loss: Tensor       # (B, T) per-token dual-clip loss, differentiable
    ratio: Tensor      # (B, T) rho, detached
    log_ratio: Tensor  # (B, T) log rho, detached
    clipped: Tensor    # (B, T) bool, a clip (either side or the dual clip) set the loss: no gradient there


def _dual_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip_low: float, clip_high: float,
               clip_ratio_c: float) -> _PG:
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    neg_adv = -advantages.unsqueeze(-1)
    unclipped = neg_adv * ratio  # -A rho: the only branch with a gradient
    with torch.no_grad():
        # value of max(-A rho, -A clip(rho)) then min(., -A c) for A < 0, in place on one buffer
        value = ratio.detach().clamp(1.0 - clip_low, 1.0 + clip_high).mul_(neg_adv)
        torch.maximum(value, unclipped, out=value)
        cap = torch.where(advantages < 0, -advantages * clip_ratio_c,
                          torch.full_like(advantages, float("inf")))
        torch.minimum(value, cap.unsqueeze(-1), out=value)
        clipped = value != unclipped
    # where() keeps -A rho's gradient where no clip is active (ties included, as the max/min would)
    loss = torch.where(clipped, value, unclipped)
    return _PG(loss, ratio.detach(), log_ratio.detach(), clipped)


def dual_clip_pg(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip_low: float = 0.2,
                 clip_high: float = 0.2, clip_ratio_c: float = 3.0) -> tuple[Tensor, Tensor]:
    """Section 3: per-token dual-clip PPO loss.

    logp, old_logp: (B, T); advantages: (B,). Returns (loss (B, T), ratio (B, T)) with
    l = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), then min(l, -A c) where A < 0. The value
    is computed without a graph and the gradient flows through -A rho where no clip is active: the
    gradient of the max/min expression, without the cost of their backward passes.
    """
    pg = _dual_clip(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                    clip_ratio_c=clip_ratio_c)
    return pg.loss, pg.ratio


def _calibration_parts(logp: Tensor, baseline_logp: Tensor, advantages: Tensor, passed: Tensor, *,
                       alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """(g, u = -s |A| d, d = logp - b), each (B, T); |A| LeakyReLU(z) = LeakyReLU(|A| z) as |A| >= 0."""
    gap = logp - baseline_logp
    scale = torch.where(passed, -advantages.abs(), advantages.abs())  # -s |A|
    u = gap * scale.unsqueeze(-1)
    return F.leaky_relu(u, negative_slope=alpha), u, gap


def calibration_term(logp: Tensor, baseline_logp: Tensor, advantages: Tensor, passed: Tensor, *,
                     alpha: float = 0.5) -> Tensor:
    """Section 4: g_t = |A| * LeakyReLU(-s * (logp_t - b_t), negative_slope=alpha), s = +1 if passed else -1.

    logp: (B, T); baseline_logp: (B, T) (token baseline) or (B, 1) (sequence baseline), detached;
    advantages: (B,); passed: (B,) bool. Returns (B, T).
    """
    return _calibration_parts(logp, baseline_logp, advantages, passed, alpha=alpha)[0]


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0. (B, T)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1.0


# ---------------------------------------------------------------------------------------------
# tensor-level losses


def _gradient_shares(logp: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """{"grad_sq_<term>"}: the squared norm of each loss term's gradient with respect to the token
    log-probs (B, T), a cheap proxy for its share of the weight gradient (one backward through the
    loss expression only, not the model). Squared norms over disjoint tokens add up over
    micro-batches and shards; `calibrl.algo.metrics.gradient_shares` turns them into shares."""
    if not logp.requires_grad:
        return {}
    out = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, logp, retain_graph=True, allow_unused=True)
        out[f"grad_sq_{name}"] = grad.pow(2).sum().detach() if grad is not None else logp.new_zeros(())
    return out


def _pg_metrics(pg: _PG, advantages: Tensor, mask_b: Tensor, maskf: Tensor, num_tokens: Tensor,
                denom: Tensor | float, *, clip_ratio_c: float) -> dict[str, Tensor]:
    """Clip fractions and k3 KL over masked tokens, divided by `denom` (no grad).

    mask_b / maskf: the loss mask as bool / float; num_tokens: its count."""
    clipped_per_row = torch.logical_and(pg.clipped, mask_b).sum(-1).to(maskf.dtype)
    positive, negative = (advantages > 0).to(maskf.dtype), (advantages < 0).to(maskf.dtype)
    dual_threshold = torch.where(advantages < 0, torch.full_like(advantages, clip_ratio_c),
                                 torch.full_like(advantages, float("inf")))
    dual = torch.count_nonzero(torch.gt(pg.ratio, dual_threshold.unsqueeze(-1)).logical_and_(mask_b))
    # k3(old vs current) per token = 1/rho - 1 + log rho
    kl_sum = _masked_sum(torch.reciprocal(pg.ratio), maskf) - num_tokens + _masked_sum(pg.log_ratio, maskf)
    return {
        "pg_clipfrac_upper": torch.dot(clipped_per_row, positive) / denom,  # A > 0 clips only above
        "pg_clipfrac_lower": (torch.dot(clipped_per_row, negative) - dual) / denom,
        "dual_clip_frac": dual / denom,
        "approx_kl": kl_sum / denom,
    }


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
             is_expert: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float = 3.0,
             agg: str = "token-mean", global_tokens: float | None = None, global_seqs: float | None = None,
             norm_length: int | None = None, diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / Dr.GRPO / DAPO policy loss: section 3's dual-clip PG over on-policy rows, aggregated.

    logp, old_logp: (B, T) float; response_mask: (B, T) bool; advantages: (B,) float; is_expert:
    (B,) bool (expert rows are ignored). The methods differ only in advantages (std or not), agg
    and clip_high, which the caller passes. Returns (loss 0-d, metrics).
    """
    mask_b = response_mask & ~is_expert.unsqueeze(-1)
    mask = mask_b.to(logp.dtype)
    num_tokens = mask_b.sum().to(logp.dtype)
    pg = _dual_clip(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                    clip_ratio_c=clip_ratio_c)
    loss = agg_loss(pg.loss, mask, agg=agg, global_tokens=_or(global_tokens, num_tokens),
                    global_seqs=global_seqs, norm_length=norm_length)
    metrics = _gradient_shares(logp, {"pg": loss}) if diagnostics else {}
    with torch.no_grad():
        metrics["pg_loss"] = loss.detach()
        metrics.update(_pg_metrics(pg, advantages, mask_b, mask, num_tokens, _or(global_tokens, num_tokens),
                                   clip_ratio_c=clip_ratio_c))
    return loss, metrics


def calibrl_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor, is_expert: Tensor,
                 passed: Tensor, expert_old_logp: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                 clip_ratio_c: float = 3.0, alpha: float = 0.5, lam: float = 0.1, agg: str = "token-mean",
                 baseline: str = "token", expert_mean_logp: Tensor | None = None,
                 has_expert: Tensor | None = None, global_tokens: float | None = None,
                 global_seqs: float | None = None, norm_length: int | None = None, diagnostics: bool = False,
                 calib_weight: str = "abs_advantage", no_expert_baseline: str = "none"
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Sections 3-5: L = agg(dual-clip PG) + lam * agg(calibration term), over on-policy tokens.

    logp, old_logp, expert_old_logp: (B, T) float; response_mask: (B, T) bool; advantages: (B,)
    float; is_expert, passed: (B,) bool. Row i of expert_old_logp holds its group's expert old
    log-probs aligned by position, zero past the expert's end (`baseline="token"`).
    `baseline="sequence"` uses expert_mean_logp: (B,), the expert's mean token log-prob over its
    own length (`attach_expert_logprobs` fills both). has_expert: (B,) bool, rows whose group kept
    an expert (default: all); other rows get no calibration term. Expert rows contribute nothing.

    Ablations (docs/algorithm.md, section 4): calib_weight `abs_advantage` (|A_i|, the paper) or
    `unit` (weight 1 on every row, A = 0 groups included); no_expert_baseline `none` (rows whose
    group dropped its expert get no calibration term) or `zero` (they get b_t = 0, as in the
    reference code). ReLU and identity in place of the LeakyReLU are alpha = 0 and alpha = 1.

    Metrics: pg_loss, calib_loss, pg_clipfrac_upper/lower, dual_clip_frac, approx_kl (k3, old vs
    current), calib_branch_full_frac / calib_branch_alpha_frac (fractions of on-policy tokens on
    the slope-1 / slope-alpha branch; tokens with A = 0 or no expert are on neither),
    expert_policy_gap (sum of b_t - logp_t over on-policy tokens with an expert, per on-policy token);
    with `diagnostics`, grad_sq_pg / grad_sq_calib (see `_gradient_shares`).
    """
    mask_b = response_mask & ~is_expert.unsqueeze(-1)
    mask = mask_b.to(logp.dtype)
    tokens_per_row = mask_b.sum(-1).to(logp.dtype)
    num_tokens = tokens_per_row.sum()
    if baseline == "token":
        b = expert_old_logp
    elif baseline == "sequence":
        if expert_mean_logp is None:
            raise ValueError("baseline='sequence' needs expert_mean_logp (B,)")
        b = expert_mean_logp.unsqueeze(-1)
    else:
        raise ValueError(f"unknown expert baseline {baseline!r}; choose token or sequence")
    if calib_weight not in CALIB_WEIGHTS or no_expert_baseline not in NO_EXPERT_BASELINES:
        raise ValueError(f"calib_weight={calib_weight!r} (choose {CALIB_WEIGHTS}), no_expert_baseline="
                         f"{no_expert_baseline!r} (choose {NO_EXPERT_BASELINES})")
    # |A_i| (or 1) on the rows where the term acts; _calibration_parts takes |.| of it
    calib_adv = advantages.abs() if calib_weight == "abs_advantage" else torch.ones_like(advantages)
    if has_expert is not None and no_expert_baseline == "none":
        calib_adv = calib_adv * has_expert.to(advantages.dtype)

    pg = _dual_clip(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                    clip_ratio_c=clip_ratio_c)
    calib, u, gap = _calibration_parts(logp, b, calib_adv, passed, alpha=alpha)
    norms = {"agg": agg, "global_tokens": _or(global_tokens, num_tokens), "global_seqs": global_seqs,
             "norm_length": norm_length}
    pg_loss = agg_loss(pg.loss, mask, **norms)
    calib_loss = agg_loss(calib, mask, **norms)
    loss = pg_loss + lam * calib_loss
    metrics = _gradient_shares(logp, {"pg": pg_loss, "calib": lam * calib_loss}) if diagnostics else {}

    with torch.no_grad():
        denom = _or(global_tokens, num_tokens)
        metrics |= {"pg_loss": pg_loss.detach(), "calib_loss": calib_loss.detach()}
        metrics.update(_pg_metrics(pg, advantages, mask_b, mask, num_tokens, denom,
                                   clip_ratio_c=clip_ratio_c))
        acting = (calib_adv != 0).to(mask.dtype)  # rows where the term acts (|A| > 0, an expert)
        full = torch.count_nonzero(torch.gt(u, 0).logical_and_(mask_b))
        metrics["calib_branch_full_frac"] = full / denom
        metrics["calib_branch_alpha_frac"] = (torch.dot(tokens_per_row, acting) - full) / denom
        with_expert = mask.new_ones(()) if has_expert is None else has_expert.to(mask.dtype)
        metrics["expert_policy_gap"] = -(_row_sums(gap.detach(), mask) * with_expert).sum() / denom
    return loss, metrics


def sft_loss(logp: Tensor, response_mask: Tensor, is_expert: Tensor, *, agg: str = "token-mean",
             global_tokens: float | None = None, global_seqs: float | None = None,
             norm_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT baseline: cross-entropy (-logp) on expert rows. logp: (B, T); response_mask: (B, T) bool;
    is_expert: (B,) bool. Returns (loss, {"sft_loss"})."""
    mask = (response_mask & is_expert.unsqueeze(-1)).to(logp.dtype)
    loss = agg_loss(-logp, mask, agg=agg, global_tokens=global_tokens, global_seqs=global_seqs,
                    norm_length=norm_length)
    return loss, {"sft_loss": loss.detach()}


def _mixed_policy_loss(expert_token_loss: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor,
                       response_mask: Tensor, is_expert: Tensor, *, clip_low: float, clip_high: float,
                       clip_ratio_c: float, agg: str, global_tokens: float | None, global_seqs: float | None,
                       norm_length: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PG on on-policy rows + a given per-token loss on expert rows, one shared normaliser."""
    expert_b = is_expert.unsqueeze(-1)
    on_b = response_mask & ~expert_b
    off_b = response_mask & expert_b
    on_mask, off_mask = on_b.to(logp.dtype), off_b.to(logp.dtype)
    pg = _dual_clip(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                    clip_ratio_c=clip_ratio_c)
    num_on = on_b.sum().to(logp.dtype)
    # one normaliser for both parts: all loss tokens (sequences) of this call unless given
    global_tokens = _or(global_tokens, num_on + off_b.sum())
    global_seqs = _or(global_seqs, response_mask.any(-1).sum())
    norms = {"agg": agg, "global_tokens": global_tokens, "global_seqs": global_seqs,
             "norm_length": norm_length}
    on_loss = agg_loss(pg.loss, on_mask, **norms)
    off_loss = agg_loss(expert_token_loss, off_mask, **norms)
    with torch.no_grad():
        metrics = {"pg_loss": on_loss.detach(), "expert_pg_loss": off_loss.detach()}
        metrics.update(_pg_metrics(pg, advantages, on_b, on_mask, num_on, global_tokens,
                                   clip_ratio_c=clip_ratio_c))
    return on_loss + off_loss, metrics


def luffy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
               is_expert: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float = 3.0,
               shaping_gamma: float = 0.1, agg: str = "token-mean", global_tokens: float | None = None,
               global_seqs: float | None = None,
               norm_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """LUFFY: on-policy rows the dual-clip PG; expert rows -A * f(p), f(p) = p / (p + gamma), p =
    exp(logp), unclipped, gradient through p. Shapes as `ppo_loss`; the normaliser counts the
    tokens of both kinds of rows (advantages should count the expert in the group baseline)."""
    p = torch.exp(logp)
    expert_loss = -advantages.unsqueeze(-1) * (p / (p + shaping_gamma))
    return _mixed_policy_loss(expert_loss, logp, old_logp, advantages, response_mask, is_expert,
                              clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, agg=agg,
                              global_tokens=global_tokens, global_seqs=global_seqs, norm_length=norm_length)


def rlplus_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
                is_expert: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                clip_ratio_c: float = 3.0, focus_exponent: float = 0.5, agg: str = "token-mean",
                global_tokens: float | None = None, global_seqs: float | None = None,
                norm_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """RL-PLUS: on-policy rows the dual-clip PG; expert tokens -A * w with
    w = 2p / (p_old + 0.5 (p_old + 1)) * sg[(1 - p)^focus_exponent], p = exp(logp),
    p_old = exp(old_logp) (the learner's old log-prob of the expert token). Shapes as `ppo_loss`."""
    p = torch.exp(logp)
    p_old = torch.exp(old_logp)
    weight = 2.0 * p / (p_old + 0.5 * (p_old + 1.0)) * (1.0 - p.detach()).clamp(min=0.0).pow(focus_exponent)
    expert_loss = -advantages.unsqueeze(-1) * weight
    return _mixed_policy_loss(expert_loss, logp, old_logp, advantages, response_mask, is_expert,
                              clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, agg=agg,
                              global_tokens=global_tokens, global_seqs=global_seqs, norm_length=norm_length)
