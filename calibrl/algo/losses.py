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

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BASELINES = ("token", "sequence")
CALIB_WEIGHTS = ("abs_advantage", "unit")
NO_EXPERT_BASELINES = ("none", "zero")
"""Expert baselines of the calibration term: position-aligned token log-probs, or the expert's mean."""


# ---------------------------------------------------------------------------------------------
# aggregation


def token_weights(mask: Tensor, *, agg: str = "token-mean", global_tokens: float | Tensor | None = None,
                  global_seqs: float | Tensor | None = None, norm_length: int | None = None) -> Tensor:
    """Section 5's agg as per-token weights w (B, T): agg(loss_mat) = sum(loss_mat * w).

    mask: (B, T) float (1 where a token counts). Modes:
    - token-mean: mask / global_tokens (default: this call's mask count);
    - seq-mean-token-mean: mask / (the row's token count) / global_seqs;
    - seq-mean-token-sum: mask / global_seqs;
    - seq-mean-token-sum-norm: mask / (norm_length or T) / global_seqs (Dr.GRPO).
    global_seqs defaults to the number of rows with at least one masked token.
    """
    if agg == "token-mean":
        return mask / (global_tokens if global_tokens is not None else mask.sum().clamp(min=1))
    _check_agg(agg)
    seqs = global_seqs if global_seqs is not None else (mask.sum(-1) > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * seqs)
    if agg == "seq-mean-token-sum":
        return mask / seqs
    return mask / ((norm_length or mask.shape[-1]) * seqs)


def _check_agg(agg: str) -> None:
    """Checked before a compiled loss runs too: raised inside one, the error would reach the caller
    wrapped by the compiler."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {', '.join(LOSS_AGGS)}")


def agg_loss(loss_mat: Tensor, mask: Tensor, *, agg: str = "token-mean", global_tokens: float | None = None,
             global_seqs: float | None = None, norm_length: int | None = None) -> Tensor:
    """Section 5's agg over the tokens where `mask` is set: sum(loss_mat * token_weights(mask)).

    loss_mat: (B, T) float; mask: (B, T) bool or float. Returns a 0-d tensor."""
    weights = token_weights(mask.to(loss_mat.dtype), agg=agg, global_tokens=global_tokens,
                            global_seqs=global_seqs, norm_length=norm_length)
    return torch.dot(loss_mat.reshape(-1), weights.reshape(-1))


def _or(global_count: float | None, local_count: Tensor) -> Tensor | float:
    """The global normaliser when given, else this call's count (at least 1)."""
    return global_count if global_count is not None else local_count.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# per-token terms with their derivative in logp
#
# The PG and calibration terms are elementwise in logp, so their derivatives are closed forms:
# computing them with the values (one pass, no graph) and handing them to autograd as a
# precomputed gradient (`_attach`) costs one multiply in backward, where autograd would replay
# every elementwise op. `_ppo_terms` and `_calibrl_terms` are the whole GRPO and CalibRL losses
# (masks, normalisers, kernel, metrics) without autograd, so that `compile_loss_kernels()` fuses each
# into one loop; the public losses validate their arguments and attach the result to `logp`.


class _WithGrad(torch.autograd.Function):
    """`value` attached to `logp` with d value / d logp = `dvalue` given: (B, T) elementwise, or a
    0-d value with its gradient (B, T). backward: grad_out * dvalue."""

    @staticmethod
    def forward(ctx, logp: Tensor, value: Tensor, dvalue: Tensor) -> Tensor:
        ctx.save_for_backward(dvalue)
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (dvalue,) = ctx.saved_tensors
        return grad_out * dvalue, None, None


def _attach(logp: Tensor, value: Tensor, dvalue: Tensor) -> Tensor:
    return _WithGrad.apply(logp, value, dvalue) if logp.requires_grad and torch.is_grad_enabled() else value


def _clip_bounds(advantages: Tensor, clip_low: float, clip_high: float, clip_ratio_c: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per row (B, 1), the ratio's range where section 3's loss follows -A rho: the loss is
    -A clamp(rho, lower, upper). max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) is -A min(rho,
    1+eps_high) where A > 0 and -A max(rho, 1-eps_low) where A < 0, which the dual clip caps at -A c:
    (lower, upper) = (-inf, 1+eps_high) where A >= 0 (A = 0 rows have loss 0 either way), else
    (1-eps_low, c)."""
    negative = (advantages < 0).unsqueeze(-1)
    lower = torch.where(negative, 1.0 - clip_low, float("-inf")).to(dtype)
    upper = torch.where(negative, clip_ratio_c, 1.0 + clip_high).to(dtype)
    return lower, upper


def _dual_clip_tokens(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                      clip_ratio_c: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Section 3 per token: (loss, kept, ratio, log ratio, -A (B, 1)), each (B, T) but -A. kept is 1.0
    where no clip set the loss (ties included, as max/min's would be), else 0.0, so the loss's
    derivative in logp is kept * rho * -A (the unclipped branch's own value, or 0): a product, not
    where(), so that a NaN (say, a NaN advantage) reaches the gradient, as autograd's would, and the
    learner's non-finite check sees it. Float ops, in place where a buffer can be reused (eager
    mode pays for every fresh (B, T) buffer)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    neg_adv = -advantages.unsqueeze(-1)
    kept = torch.clamp(ratio, *_clip_bounds(advantages, clip_low, clip_high, clip_ratio_c, ratio.dtype))
    value = kept * neg_adv
    return value, kept.eq_(ratio), ratio, log_ratio, neg_adv


def _calibration_tokens(logp: Tensor, baseline_logp: Tensor, scale: Tensor,
                        alpha: float) -> tuple[Tensor, Tensor]:
    """Section 4 per token, with scale = -s |A| (B, 1): (g = LeakyReLU(u), d g / d logp), u = scale *
    (logp - b); |A| LeakyReLU(z) = LeakyReLU(|A| z) as |A| >= 0."""
    u = (logp - baseline_logp) * scale
    return torch.nn.functional.leaky_relu(u, alpha), torch.ops.aten.leaky_relu_backward(
        scale.expand_as(u), u, alpha, False)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over two (B, T) tensors, without the product's buffer."""
    return torch.linalg.vecdot(a, b).sum()


def _pg_kernel(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, weights: Tensor,
               clip_low: float, clip_high: float, clip_ratio_c: float,
               diagnostics: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted dual-clip PG: (d loss / d logp (B, T), sums). mask: (B, T) float, the loss
    tokens; weights: their aggregation weights. sums: loss, clipped_rows (B,), dual, kl (k3 of old
    vs current: 1/rho - 1 + log rho), grad_sq (with diagnostics).

    Written for eager mode as much as for the compiler: float ops only, in place where a buffer can
    be reused, reductions as dot products."""
    value, kept, ratio, log_ratio, neg_adv = _dual_clip_tokens(logp, old_logp, advantages, clip_low,
                                                               clip_high, clip_ratio_c)
    clipped_rows = mask.sum(-1) - torch.linalg.vecdot(kept, mask)
    grad = kept.mul_(ratio).mul_(neg_adv).mul_(weights)  # a NaN advantage reaches the gradient
    dual_at = torch.where(advantages < 0, clip_ratio_c, float("inf")).to(ratio.dtype).unsqueeze(-1)
    over = (ratio - dual_at).clamp_(min=0.0).sign_()
    kl = ratio.reciprocal_().sub_(1.0).add_(log_ratio)
    sums = {"loss": _dot(value, weights), "clipped_rows": clipped_rows, "dual": _dot(over, mask),
            "kl": _dot(kl, mask)}
    if diagnostics:
        sums["grad_sq"] = _dot(grad, grad)
    return grad, sums


def _calibrl_kernel(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, weights: Tensor,
                    baseline_logp: Tensor, scale: Tensor, with_expert: Tensor, clip_low: float,
                    clip_high: float, clip_ratio_c: float, alpha: float, lam: float,
                    diagnostics: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """PG + lam x calibration term: (d loss / d logp, sums); `_pg_kernel`'s sums plus calib, full
    (tokens on the slope-1 branch) and gap (sum of logp - b over tokens with an expert).

    With w the aggregation weights and full = [scale * gap > 0] (the slope-1 branch): the term's
    weighted gradient is d = (alpha + (1 - alpha) full) * scale * w, and its weighted value
    LeakyReLU(scale * gap) * w is d * gap. Written so for the compiled loop (no sign(), one
    comparison serving the slope and the branch count); at alpha = 0.5 (the default), 0 or 1 every
    product is the one LeakyReLU's own backward would give, bit for bit."""
    grad, sums = _pg_kernel(logp, old_logp, advantages, mask, weights, clip_low, clip_high, clip_ratio_c,
                            diagnostics)
    gap = logp - baseline_logp
    full = (gap * scale).gt_(0.0)  # 1.0 on the slope-1 branch, else 0.0
    dcalib = torch.addcmul(scale * alpha, full, scale * (1.0 - alpha)).mul_(weights)
    grad.add_(dcalib, alpha=lam)
    sums |= {"calib": _dot(dcalib, gap), "full": _dot(full, mask),
             "gap": torch.dot(torch.linalg.vecdot(gap, mask), with_expert)}
    if diagnostics:
        sums["grad_sq_calib"] = lam * lam * _dot(dcalib, dcalib)
    return grad, sums


def _ppo_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor, is_expert: Tensor,
               global_tokens: float | None, global_seqs: float | None, agg: str, norm_length: int | None,
               clip_low: float, clip_high: float, clip_ratio_c: float,
               diagnostics: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """`ppo_loss` without autograd: (loss, d loss / d logp, metrics), in one compilable function."""
    mask = _on_policy_mask(response_mask, is_expert, logp.dtype)
    denom = _or(global_tokens, mask.sum())
    weights = token_weights(mask, agg=agg, global_tokens=denom, global_seqs=global_seqs,
                            norm_length=norm_length)
    grad, sums = _pg_kernel(logp, old_logp, advantages, mask, weights, clip_low, clip_high, clip_ratio_c,
                            diagnostics)
    metrics = {"pg_loss": sums["loss"]} | _pg_metrics(sums, advantages, denom)
    if diagnostics:
        metrics["grad_sq_pg"] = sums["grad_sq"]
    return sums["loss"], grad, metrics


def _calibrl_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
                   is_expert: Tensor, passed: Tensor, baseline_logp: Tensor, has_expert: Tensor | None,
                   global_tokens: float | None, global_seqs: float | None, agg: str,
                   norm_length: int | None, clip_low: float, clip_high: float, clip_ratio_c: float,
                   alpha: float, lam: float, calib_weight: str, no_expert_baseline: str,
                   diagnostics: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """`calibrl_loss` without autograd: (loss, d loss / d logp, metrics), in one compilable function."""
    mask = _on_policy_mask(response_mask, is_expert, logp.dtype)
    tokens_per_row = mask.sum(-1)
    denom = _or(global_tokens, tokens_per_row.sum())
    weights = token_weights(mask, agg=agg, global_tokens=denom, global_seqs=global_seqs,
                            norm_length=norm_length)
    # |A_i| (or 1) on the rows where the term acts
    calib_adv = advantages.abs() if calib_weight == "abs_advantage" else torch.ones_like(advantages)
    if has_expert is not None and no_expert_baseline == "none":
        calib_adv = calib_adv * has_expert.to(advantages.dtype)
    with_expert = torch.ones_like(tokens_per_row) if has_expert is None else has_expert.to(mask.dtype)
    grad, sums = _calibrl_kernel(logp, old_logp, advantages, mask, weights, baseline_logp,
                                 _calibration_scale(calib_adv, passed), with_expert, clip_low, clip_high,
                                 clip_ratio_c, alpha, lam, diagnostics)
    metrics = {"pg_loss": sums["loss"], "calib_loss": sums["calib"]} | _pg_metrics(sums, advantages, denom)
    acting = (calib_adv != 0).to(mask.dtype)  # rows where the term acts (|A| > 0, an expert)
    metrics["calib_branch_full_frac"] = sums["full"] / denom
    metrics["calib_branch_alpha_frac"] = (torch.dot(tokens_per_row, acting) - sums["full"]) / denom
    metrics["expert_policy_gap"] = -sums["gap"] / denom
    if diagnostics:
        metrics |= {"grad_sq_pg": sums["grad_sq"], "grad_sq_calib": sums["grad_sq_calib"]}
    return sums["loss"] + lam * sums["calib"], grad, metrics


def _on_policy_mask(response_mask: Tensor, is_expert: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) float: response tokens of on-policy rows."""
    return (~is_expert).to(dtype).unsqueeze(-1) * response_mask


_KERNELS = {"pg": _pg_kernel, "ppo": _ppo_terms, "calibrl": _calibrl_terms}
_NORMALISERS = ("global_tokens", "global_seqs")
"""The kernels' keyword arguments that change with every batch."""


def _length_multiple_of(fn, multiple: int):
    """`fn` (a loss kernel) stating, inside the graph the compiler traces, that the length T of its
    (B, T) inputs is a multiple of `multiple`. With T dynamic, inductor cannot prove a row's offset
    (row x T) a multiple of 16 elements, so a Triton kernel gets no divisibility hint for T and loads
    each token with a 32-bit load; stated, it loads four at a time (128-bit). Every (B, T) input states
    it: the compiler unifies their lengths into one symbol, which keeps the fact only if its own check
    stated it. No message argument: its lambda would break the graph. A (B, 1) input (the sequence
    baseline) states nothing."""

    def run(*args, **kwargs):
        for arg in args:
            if isinstance(arg, Tensor) and arg.dim() == 2 and arg.shape[-1] != 1:
                torch._check(arg.shape[-1] % multiple == 0)
        return fn(*args, **kwargs)
    # a code object of its own: torch.compile keeps its graphs (and counts recompiles) per code
    # object, and every kernel's wrapper would otherwise share this one
    run.__code__ = run.__code__.replace()
    return run


class _Compiled:
    """`fn` through `torch.compile`, with what each kind of argument needs (dynamo's defaults would
    make every float an input tensor, and compile a graph per shape):
    - tensor shapes are dynamic from the first call on (its tensors are marked so);
    - the normalisers, new with every batch, go in as 0-d tensors;
    - every other float (clip ranges, alpha, lam: constants of a run) is compiled into the graph. A
      new value compiles once more, with that float an input from then on.
    Unwrapping the floats saves the compiled call a tensor per float; CalibRL has two more (alpha,
    lam) than GRPO.

    `length_multiple` > 1: inputs whose length T is a multiple of it go through a second graph that
    knows it (`_length_multiple_of`: vector loads in the GPU kernels); a learner pads its batches'
    T so (`learner.pad_to_multiple_of`). Other lengths take the first graph, compiled when one comes.

    Where the compiler fails (no C++ compiler on a CPU machine, a Triton that cannot build for the
    GPU), the loss logs one warning and runs eagerly from then on: the same function, slower."""

    def __init__(self, name: str, fn, backend="inductor", length_multiple: int = 1):
        self._name, self._eager = name, fn
        self._fn = torch.compile(fn, backend=backend)
        self._multiple = length_multiple
        self._fn_multiple = (torch.compile(_length_multiple_of(fn, length_multiple), backend=backend)
                             if length_multiple > 1 else None)
        self._marked: set[int] = set()
        """ids of the compiled functions called once (their first call marks its tensors dynamic)."""

    def __call__(self, *args, **kwargs):
        for key in _NORMALISERS:
            if isinstance(kwargs.get(key), (int, float)):
                kwargs[key] = torch.scalar_tensor(kwargs[key], dtype=args[0].dtype, device=args[0].device)
        aligned = self._fn_multiple is not None and args[0].shape[-1] % self._multiple == 0
        fn = self._fn_multiple if aligned else self._fn
        if id(fn) not in self._marked:
            for arg in args:
                if isinstance(arg, Tensor):
                    for dim in range(arg.dim()):
                        torch._dynamo.maybe_mark_dynamic(arg, dim)
            self._marked.add(id(fn))
        try:
            return fn(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            cause = getattr(err, "inner_exception", None) or err
            first_line = (str(cause).strip().splitlines() or [""])[0]
            log.warning("torch.compile could not build the %s loss (%s: %s); it runs eagerly from now on",
                        self._name, type(cause).__name__, first_line)
            self._fn, self._fn_multiple = self._eager, None
            return self._eager(*args, **kwargs)


def loss_kernels_compiled() -> bool:
    """Whether the losses run fused: `compile_loss_kernels()` was called and no kernel fell back to
    eager mode."""
    return all(isinstance(k, _Compiled) and k._fn is not k._eager for k in _KERNELS.values())


def compile_loss_kernels(enabled: bool = True, *, backend="inductor", length_multiple: int = 1) -> None:
    """Run the PG kernel and the whole GRPO and CalibRL losses through `torch.compile` (one fused loop
    each, for any shape; see `_Compiled`), or back in eager mode. Compiling costs seconds on the first
    call of each process. `backend`: torch.compile's. `length_multiple`: batches whose response length
    is a multiple of it use graphs that know it (see `_Compiled`)."""
    if length_multiple < 1:
        raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
    _KERNELS.update((name, _Compiled(name, fn, backend, length_multiple) if enabled else fn)
                    for name, fn in {"pg": _pg_kernel, "ppo": _ppo_terms, "calibrl": _calibrl_terms}.items())


def dual_clip_pg(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip_low: float = 0.2,
                 clip_high: float = 0.2, clip_ratio_c: float = 3.0) -> tuple[Tensor, Tensor]:
    """Section 3: per-token dual-clip PPO loss.

    logp, old_logp: (B, T); advantages: (B,). Returns (loss (B, T), ratio (B, T)) with
    l = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), then min(l, -A c) where A < 0; the
    gradient flows through -A rho where no clip is active.
    """
    with torch.no_grad():
        value, kept, ratio, _, neg_adv = _dual_clip_tokens(logp, old_logp, advantages, clip_low, clip_high,
                                                           clip_ratio_c)
    return _attach(logp, value, kept * ratio * neg_adv), ratio


def _calibration_scale(advantages: Tensor, passed: Tensor) -> Tensor:
    """-s |A| as (B, 1): s = +1 on passing rows, -1 on failing ones."""
    return torch.where(passed, -advantages.abs(), advantages.abs()).unsqueeze(-1)


def calibration_term(logp: Tensor, baseline_logp: Tensor, advantages: Tensor, passed: Tensor, *,
                     alpha: float = 0.5) -> Tensor:
    """Section 4: g_t = |A| * LeakyReLU(-s * (logp_t - b_t), negative_slope=alpha), s = +1 if passed else -1.

    logp: (B, T); baseline_logp: (B, T) (token baseline) or (B, 1) (sequence baseline), detached;
    advantages: (B,); passed: (B,) bool. Returns (B, T).
    """
    with torch.no_grad():
        scale = _calibration_scale(advantages, passed)
        value, dvalue = _calibration_tokens(logp, baseline_logp, scale, alpha)
    return _attach(logp, value, dvalue)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0. (B, T)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1.0


# ---------------------------------------------------------------------------------------------
# tensor-level losses


def _pg_metrics(sums: dict[str, Tensor], advantages: Tensor, denom: Tensor | float) -> dict[str, Tensor]:
    """Clip fractions and k3 KL over the loss tokens, from a kernel's sums, divided by `denom`."""
    clipped_rows = sums["clipped_rows"]
    positive, negative = (advantages > 0).to(clipped_rows.dtype), (advantages < 0).to(clipped_rows.dtype)
    return {
        "pg_clipfrac_upper": torch.dot(clipped_rows, positive) / denom,  # A > 0 clips only above
        "pg_clipfrac_lower": (torch.dot(clipped_rows, negative) - sums["dual"]) / denom,
        "dual_clip_frac": sums["dual"] / denom,
        "approx_kl": sums["kl"] / denom,
    }


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
             is_expert: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float = 3.0,
             agg: str = "token-mean", global_tokens: float | None = None, global_seqs: float | None = None,
             norm_length: int | None = None, diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / Dr.GRPO / DAPO policy loss: section 3's dual-clip PG over on-policy rows, aggregated.

    logp, old_logp: (B, T) float; response_mask: (B, T) bool; advantages: (B,) float; is_expert:
    (B,) bool (expert rows are ignored). The methods differ only in advantages (std or not), agg
    and clip_high, which the caller passes. Returns (loss 0-d, metrics); with `diagnostics`,
    grad_sq_pg, the squared norm of the loss's gradient in logp (see `calibrl_loss`).
    """
    _check_agg(agg)
    with torch.no_grad():
        loss, grad, metrics = _KERNELS["ppo"](logp.detach(), old_logp, advantages, response_mask, is_expert,
                                              agg=agg, norm_length=norm_length, clip_low=clip_low,
                                              clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                                              diagnostics=diagnostics, global_tokens=global_tokens,
                                              global_seqs=global_seqs)
    return _attach(logp, loss, grad), metrics


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
    with `diagnostics`, grad_sq_pg / grad_sq_calib: the squared norms of the two terms' gradients in
    logp (B, T), a cheap proxy for their shares of the weight gradient (squared norms over disjoint
    tokens add up over micro-batches and shards; `calibrl.algo.metrics.gradient_shares` turns them
    into shares).
    """
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
    _check_agg(agg)
    with torch.no_grad():
        loss, grad, metrics = _KERNELS["calibrl"](
            logp.detach(), old_logp, advantages, response_mask, is_expert, passed, b, has_expert,
            agg=agg, norm_length=norm_length, clip_low=clip_low, clip_high=clip_high,
            clip_ratio_c=clip_ratio_c, alpha=alpha, lam=lam, calib_weight=calib_weight,
            no_expert_baseline=no_expert_baseline, diagnostics=diagnostics, global_tokens=global_tokens,
            global_seqs=global_seqs)
    return _attach(logp, loss, grad), metrics


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
    on_mask = (response_mask & ~expert_b).to(logp.dtype)
    off_mask = (response_mask & expert_b).to(logp.dtype)
    # one normaliser for both parts: all loss tokens (sequences) of this call unless given
    global_tokens = _or(global_tokens, on_mask.sum() + off_mask.sum())
    global_seqs = _or(global_seqs, response_mask.any(-1).sum())
    norms = {"agg": agg, "global_tokens": global_tokens, "global_seqs": global_seqs,
             "norm_length": norm_length}
    weights = token_weights(on_mask, **norms)
    with torch.no_grad():
        grad, sums = _KERNELS["pg"](logp.detach(), old_logp, advantages, on_mask, weights, clip_low,
                                    clip_high, clip_ratio_c, False)
    off_loss = agg_loss(expert_token_loss, off_mask, **norms)
    with torch.no_grad():
        metrics = {"pg_loss": sums["loss"], "expert_pg_loss": off_loss.detach()}
        metrics.update(_pg_metrics(sums, advantages, global_tokens))
    return _attach(logp, sums["loss"], grad) + off_loss, metrics


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
