"""Sections 3-5: hand-worked examples, loop-vs-vectorised, gradient direction, micro-batch / shard
invariance."""

import contextlib
import math

import pytest
import torch

from calibrl.algo import (
    LOSS_AGGS,
    METHODS,
    agg_loss,
    calibration_term,
    calibrl_loss,
    compute_loss,
    dual_clip_pg,
    loss_normalizers,
    luffy_loss,
    ppo_loss,
    rlplus_loss,
    sft_loss,
)

from ._random_batch import random_batch

LN = math.log


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- hand-worked: section 3


@pytest.mark.parametrize("adv, ratio, loss, grad", [
    (1.0, 0.5, -0.5, -0.5),    # A > 0, inside the lower side: unclipped, -A rho
    (1.0, 1.5, -1.2, 0.0),     # A > 0, above 1 + eps_high: clipped at 1.2, no gradient
    (-1.0, 0.5, 0.8, 0.0),     # A < 0, below 1 - eps_low: clipped at 0.8, no gradient
    (-1.0, 2.0, 2.0, 2.0),     # A < 0, ratio 2 < c: unclipped, -A rho, gradient -A rho
    (-1.0, 5.0, 3.0, 0.0),     # A < 0, ratio 5 > c = 3: dual clip at -A c
    (-0.5, 10.0, 1.5, 0.0),    # dual clip scales with |A|
])
def test_dual_clip_hand_worked(adv, ratio, loss, grad):
    logp = t([[LN(ratio)]]).requires_grad_()
    pg, rho = dual_clip_pg(logp, t([[0.0]]), t([adv]), clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0)
    pg.sum().backward()
    assert pg.item() == pytest.approx(loss)
    assert rho.item() == pytest.approx(ratio)
    assert logp.grad.item() == pytest.approx(grad)


def test_clip_high_is_asymmetric():
    # DAPO's clip-higher: with eps_high = 0.28 a ratio of 1.25 is not clipped for A > 0
    logp = t([[LN(1.25)]])
    pg, _ = dual_clip_pg(logp, t([[0.0]]), t([1.0]), clip_low=0.2, clip_high=0.28)
    assert pg.item() == pytest.approx(-1.25)
    pg, _ = dual_clip_pg(logp, t([[0.0]]), t([1.0]), clip_low=0.2, clip_high=0.2)
    assert pg.item() == pytest.approx(-1.2)


# ---------------------------------------------------------------- hand-worked: section 4


@pytest.mark.parametrize("passed, adv, logp, b, value, grad", [
    (True, 0.5, -2.0, -1.0, 0.5, -0.5),       # passing, below the expert: full branch, g = |A| (b - logp)
    (True, 0.5, -0.5, -1.0, -0.125, -0.25),   # passing, above the expert: alpha branch, slope alpha
    (False, -0.5, -0.5, -1.0, 0.25, 0.5),     # failing, above the expert (overconfident): full branch
    (False, -0.5, -2.0, -1.0, -0.25, 0.25),   # failing, below the expert: alpha branch
    (True, -0.2, -2.0, -1.0, 0.2, -0.2),      # |A| is used: a passing row with A < 0 is still pushed up
    (True, 0.0, -2.0, -1.0, 0.0, 0.0),        # A = 0: no calibration signal
])
def test_calibration_term_hand_worked(passed, adv, logp, b, value, grad):
    x = t([[logp]]).requires_grad_()
    g = calibration_term(x, t([[b]]), t([adv]), torch.tensor([passed]), alpha=0.5)
    g.sum().backward()
    assert g.item() == pytest.approx(value)
    assert x.grad.item() == pytest.approx(grad)


def test_calibrl_loss_hand_worked_two_rows_and_expert():
    # rows: passing response (A = 0.5), failing response (A = -0.5), the expert row (ignored)
    # old = 0 everywhere, logp: ratios inside the clip range so PG = -A rho.
    logp = t([[LN(1.1), LN(0.9), 0.0], [LN(1.0), LN(1.1), LN(0.9)], [-7.0, -7.0, -7.0]])
    old = torch.zeros(3, 3, dtype=torch.float64)
    old[2] = -7.0
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    adv = t([0.5, -0.5, 0.3])
    is_expert = torch.tensor([False, False, True])
    passed = torch.tensor([True, False, True])
    b = t([[-0.5, 0.2, 0.0], [-0.5, 0.2, 0.0], [0.0, 0.0, 0.0]])  # expert of length 2: b = 0 past its end
    loss, m = calibrl_loss(logp, old, adv, mask, is_expert, passed, b, alpha=0.5, lam=0.1)
    pg = [-0.5 * 1.1, -0.5 * 0.9, 0.5 * 1.0, 0.5 * 1.1, 0.5 * 0.9]
    # d = logp - b; passing: z = -d, failing: z = d; g = |A| leaky(z)
    d = [LN(1.1) + 0.5, LN(0.9) - 0.2, LN(1.0) + 0.5, LN(1.1) - 0.2, LN(0.9) - 0.0]
    z = [-d[0], -d[1], d[2], d[3], d[4]]
    g = [0.5 * (v if v > 0 else 0.5 * v) for v in z]
    assert m["pg_loss"].item() == pytest.approx(sum(pg) / 5)
    assert m["calib_loss"].item() == pytest.approx(sum(g) / 5)
    assert loss.item() == pytest.approx(sum(pg) / 5 + 0.1 * sum(g) / 5)
    full = sum(v > 0 for v in z)
    assert m["calib_branch_full_frac"].item() == pytest.approx(full / 5)
    assert m["calib_branch_alpha_frac"].item() == pytest.approx((5 - full) / 5)
    assert m["expert_policy_gap"].item() == pytest.approx(-sum(d) / 5)


def test_sequence_baseline_uses_expert_mean():
    logp = t([[-1.0, -3.0]]).requires_grad_()
    args = (t([[-1.0, -3.0]]), t([1.0]), torch.tensor([[True, True]]), torch.tensor([False]),
            torch.tensor([True]), t([[-0.5, -4.0]]))
    _, m_tok = calibrl_loss(logp, *args, baseline="token", alpha=0.5)
    _, m_seq = calibrl_loss(logp, *args, baseline="sequence", expert_mean_logp=t([-2.0]), alpha=0.5)
    # token: d = (-0.5, 1.0) -> z = (0.5, -1.0) -> g = (0.5, -0.5); sequence: d = (1, -1) -> g = (-0.5, 1)
    assert m_tok["calib_loss"].item() == pytest.approx((0.5 - 0.5) / 2)
    assert m_seq["calib_loss"].item() == pytest.approx((-0.5 + 1.0) / 2)
    with pytest.raises(ValueError):
        calibrl_loss(logp, *args, baseline="sequence")


def test_rows_without_expert_get_no_calibration_term():
    logp = t([[-1.0, -2.0], [-1.0, -2.0]])
    args = (logp.clone(), t([1.0, 1.0]), torch.ones(2, 2, dtype=torch.bool), torch.tensor([False, False]),
            torch.tensor([True, True]), t([[-0.5, -0.5], [-0.5, -0.5]]))
    _, m = calibrl_loss(logp, *args, has_expert=torch.tensor([True, False]))
    _, m_all = calibrl_loss(logp, *args)
    assert m["calib_loss"].item() == pytest.approx(m_all["calib_loss"].item() / 2)
    assert m_all["calib_loss"].item() != 0


# ---------------------------------------------------------------- gradient direction


@pytest.mark.parametrize("passed", [True, False])
@pytest.mark.parametrize("branch_offset", [-1.0, 1.0])  # logp below / above the expert baseline
@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_calibration_gradient_direction(passed, branch_offset, adv_sign):
    b = torch.full((1, 4), -2.0, dtype=torch.float64)
    logp = (b + branch_offset).clone().requires_grad_()
    opt = torch.optim.SGD([logp], lr=0.1)
    before = logp.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        g = calibration_term(logp, b, t([0.4 * adv_sign]), torch.tensor([passed]), alpha=0.5)
        g.mean().backward()
        opt.step()
    moved = logp.detach() - before
    assert (moved > 0).all() if passed else (moved < 0).all()


def test_calibrl_gradient_direction_through_full_loss():
    # the calibration part of calibrl_loss's gradient = its gradient minus the PG loss's gradient;
    # tokens: logp above the baseline (-3) and below it (0.5), so both branches for both signs
    batch_kwargs = {"old_logp": t([[-1.0, -1.0]]), "advantages": t([0.5]),
                        "response_mask": torch.tensor([[True, True]]),
                        "is_expert": torch.tensor([False]), "expert_old_logp": t([[-3.0, 0.5]])}
    for passed in (True, False):
        logp = t([[-1.0, -1.0]]).requires_grad_()
        loss, _ = calibrl_loss(logp, batch_kwargs["old_logp"], batch_kwargs["advantages"],
                               batch_kwargs["response_mask"], batch_kwargs["is_expert"],
                               torch.tensor([passed]), batch_kwargs["expert_old_logp"], lam=1.0)
        loss.backward()
        calib_grad = logp.grad.clone()
        logp.grad = None
        pg, _ = ppo_loss(logp, batch_kwargs["old_logp"], batch_kwargs["advantages"],
                         batch_kwargs["response_mask"], batch_kwargs["is_expert"])
        pg.backward()
        extra = calib_grad - logp.grad  # gradient of lam * calibration term
        assert (extra < 0).all() if passed else (extra > 0).all()


# ---------------------------------------------------------------- loop reference


def _ref_agg(rows, agg, width):
    rows = [r for r in rows if r]
    ntok, nseq = sum(len(r) for r in rows), len(rows)
    if agg == "token-mean":
        return sum(sum(r) for r in rows) / max(ntok, 1)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / max(nseq, 1)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / max(nseq, 1)
    return sum(sum(r) for r in rows) / width / max(nseq, 1)


def _ref_pg(logp, old, adv, cl, ch, c):
    rho = math.exp(logp - old)
    loss = max(-adv * rho, -adv * min(max(rho, 1 - cl), 1 + ch))
    return min(loss, -adv * c) if adv < 0 else loss


def reference_loss(name, logp, batch, *, agg, baseline="token", lam=0.1, alpha=0.5, cl=0.2, ch=0.28, c=3.0):
    """Per-row, per-token Python implementation of METHODS[name].loss (one normaliser per call)."""
    L = logp.tolist()
    O = batch.old_logp.tolist()
    E = batch.expert_old_logp.tolist()
    M = batch.response_mask.tolist()
    A = batch.advantages.tolist()
    width = logp.shape[1]
    main, side = [], []
    for i in range(len(L)):
        expert = bool(batch.is_expert[i])
        toks = [k for k in range(width) if M[i][k]]
        if name == "sft":
            main.append([-L[i][k] for k in toks] if expert else [])
            continue
        if expert and name in ("luffy", "rlplus"):
            row = []
            for k in toks:
                p = math.exp(L[i][k])
                if name == "luffy":
                    w = p / (p + 0.1)
                else:
                    po = math.exp(O[i][k])
                    w = 2 * p / (po + 0.5 * (po + 1)) * (1 - p) ** 0.5
                row.append(-A[i] * w)
            main.append(row)
            continue
        if expert:
            continue
        main.append([_ref_pg(L[i][k], O[i][k], A[i], cl, ch, c) for k in toks])
        if name == "calibrl":
            s = 1 if bool(batch.passed[i]) else -1
            row = []
            for k in toks:
                b = E[i][k] if baseline == "token" else float(batch.expert_mean_logp[i])
                z = -s * (L[i][k] - b)
                row.append(abs(A[i]) * (z if z > 0 else alpha * z) if bool(batch.has_expert[i]) else 0.0)
            side.append(row)
    loss = _ref_agg(main, agg, width)
    return loss + lam * _ref_agg(side, agg, width) if name == "calibrl" else loss


NAMES = ["calibrl", "grpo", "sft", "luffy", "rlplus"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_loop_vs_vectorised(name, agg, seed):
    batch = random_batch(7, seed=seed, expert_in_baseline=name in ("luffy", "rlplus"))
    gen = torch.Generator().manual_seed(seed + 10)
    logp = batch.old_logp + 0.4 * torch.randn(batch.old_logp.shape, generator=gen)
    logp = logp.clamp(max=-1e-3)
    loss, _ = compute_loss(name, logp, batch, agg=agg, clip_high=0.28)
    assert loss.item() == pytest.approx(reference_loss(name, logp, batch, agg=agg), rel=1e-5, abs=1e-6)


def test_loop_vs_vectorised_sequence_baseline():
    batch = random_batch(7, seed=3)
    logp = (batch.old_logp + 0.3).clamp(max=-1e-3)
    loss, _ = METHODS["calibrl"].loss(logp, batch, baseline="sequence", clip_high=0.28)
    ref = reference_loss("calibrl", logp, batch, agg="token-mean", baseline="sequence")
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_tensor_functions_match_batch_entries():
    batch = random_batch(5, seed=4, mixup="always")
    logp = batch.old_logp - 0.1
    a, _ = ppo_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert)
    b, _ = METHODS["dapo"].loss(logp, batch)
    assert a.item() == b.item()
    a, _ = sft_loss(logp, batch.response_mask, batch.is_expert)
    assert a.item() == pytest.approx(-(logp * batch.response_mask * batch.is_expert[:, None]).sum().item()
                                     / (batch.response_mask * batch.is_expert[:, None]).sum().item())
    for fn in (luffy_loss, rlplus_loss):
        a, _ = fn(logp, batch.old_logp, batch.advantages, batch.response_mask, batch.is_expert)
        assert torch.isfinite(a)


def test_agg_loss_modes_hand_worked():
    loss = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert agg_loss(loss, mask, agg="token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss, mask, agg="seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, mask, agg="seq-mean-token-sum").item() == pytest.approx(10 / 2)
    assert agg_loss(loss, mask, agg="seq-mean-token-sum-norm").item() == pytest.approx(10 / 3 / 2)
    assert (agg_loss(loss, mask, agg="seq-mean-token-sum-norm", norm_length=10).item()
            == pytest.approx(10 / 10 / 2))
    with pytest.raises(ValueError):
        agg_loss(loss, mask, agg="mean")


# ---------------------------------------------------------------- invariance


def _loss_and_grad(name, batch, logp_full, pieces, agg, baseline="token"):
    norms = loss_normalizers(name, batch)
    logp = logp_full.clone().requires_grad_()
    total = 0.0
    metric_sums = {}
    for idx in pieces:
        piece = batch.select(idx)
        loss, metrics = compute_loss(name, logp[idx], piece, agg=agg, baseline=baseline, norm_length=20,
                                     kl_coef=0.05, **norms)
        loss.backward()
        total += loss.item()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.item()
    return total, logp.grad, metric_sums


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_micro_batch_and_shard_invariance(name, agg):
    batch = random_batch(6, seed=5, expert_in_baseline=name in ("luffy", "rlplus"))
    gen = torch.Generator().manual_seed(7)
    logp = (batch.old_logp + 0.5 * torch.randn(batch.old_logp.shape, generator=gen)).clamp(max=-1e-3)
    rows = len(batch)
    whole, whole_grad, whole_metrics = _loss_and_grad(name, batch, logp, [torch.arange(rows)], agg)
    micro = list(torch.tensor_split(torch.arange(rows), 5))                      # micro-batches
    shards = [torch.randperm(rows, generator=gen)[: rows // 3]]                  # uneven, shuffled shards
    rest = torch.tensor(sorted(set(range(rows)) - set(shards[0].tolist())))
    shards += list(torch.tensor_split(rest, 2))
    for pieces in (micro, shards):
        total, grad, metrics = _loss_and_grad(name, batch, logp, pieces, agg)
        assert total == pytest.approx(whole, rel=1e-5, abs=1e-7)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-7)
        for k in ("loss", "pg_loss", "calib_loss", "sft_loss", "pg_clipfrac_upper", "approx_kl"):
            if k in whole_metrics:
                assert metrics[k] == pytest.approx(whole_metrics[k], rel=1e-5, abs=1e-7)


def test_invariance_sequence_baseline_and_split_method():
    batch = random_batch(6, seed=6)
    logp = (batch.old_logp + 0.2).clamp(max=-1e-3)
    whole, whole_grad, _ = _loss_and_grad("calibrl", batch, logp, [torch.arange(len(batch))], "token-mean",
                                          baseline="sequence")
    pieces = list(torch.tensor_split(torch.arange(len(batch)), 4))
    total, grad, _ = _loss_and_grad("calibrl", batch, logp, pieces, "token-mean", baseline="sequence")
    assert total == pytest.approx(whole, rel=1e-5)
    torch.testing.assert_close(grad, whole_grad)
    # TrainBatch.split gives the same pieces as tensor_split
    for piece, idx in zip(batch.split(4), pieces):
        assert torch.equal(piece.response_ids, batch.response_ids[idx])


def test_without_global_normaliser_pieces_differ():
    # the normaliser matters: local normalisation of unequal pieces is not the whole-batch loss
    batch = random_batch(6, seed=5)
    logp = (batch.old_logp + 0.3).clamp(max=-1e-3)
    whole, _ = compute_loss("calibrl", logp, batch)
    pieces = batch.split(3)
    parts = [compute_loss("calibrl", logp[idx], p)[0].item()
             for p, idx in zip(pieces, torch.tensor_split(torch.arange(len(batch)), 3))]
    assert sum(parts) != pytest.approx(whole.item(), rel=1e-3)


def test_compute_loss_entropy_and_kl():
    batch = random_batch(4, seed=8)
    logp = (batch.old_logp + 0.2).clamp(max=-1e-3)
    entropy = torch.rand(batch.old_logp.shape)
    base, _ = compute_loss("grpo", logp, batch)
    with_terms, m = compute_loss("grpo", logp, batch, entropy=entropy, entropy_coef=0.01, kl_coef=0.1)
    assert with_terms.item() == pytest.approx(base.item() - 0.01 * m["entropy"].item()
                                              + 0.1 * m["kl_loss"].item())
    assert m["kl_loss"].item() > 0
    with pytest.raises(ValueError):
        compute_loss("grpo", logp, batch, entropy_coef=0.01)


def test_clip_fraction_metrics_hand_worked():
    # A > 0: ratios 1.5 (upper clip), 1.0; A < 0: ratios 0.5 (lower clip), 5.0 (dual clip), 1.0; one pad token
    ratios = t([[1.5, 1.0, 1.0], [0.5, 5.0, 1.0]])
    logp = ratios.log()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    _, m = ppo_loss(logp, torch.zeros_like(logp), t([1.0, -1.0]), mask, torch.tensor([False, False]))
    assert m["pg_clipfrac_upper"].item() == pytest.approx(1 / 5)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 5)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 5)
    k3 = [1 / r - 1 + math.log(r) for r in (1.5, 1.0, 0.5, 5.0, 1.0)]
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / 5)


def test_compiled_kernels_match_eager():
    """`compile_loss_kernels()` fuses the PG and CalibRL kernels: same loss, gradient and metrics."""
    from calibrl.algo import compile_loss_kernels

    batch = random_batch(6, seed=5)
    logp0 = (batch.old_logp + 0.4 * torch.randn(batch.old_logp.shape,
                                                generator=torch.Generator().manual_seed(5))).clamp(max=-1e-3)

    def run(name):
        logp = logp0.clone().requires_grad_()
        loss, metrics = compute_loss(name, logp, batch, agg="seq-mean-token-mean",
                                     diagnostics=name == "calibrl")
        loss.backward()
        return loss.detach(), logp.grad, metrics

    eager = {name: run(name) for name in ("calibrl", "grpo", "luffy")}
    compile_loss_kernels()
    try:
        fused = {name: run(name) for name in eager}
    finally:
        compile_loss_kernels(False)
    for name, (loss, grad, metrics) in eager.items():
        f_loss, f_grad, f_metrics = fused[name]
        assert grad.abs().sum() > 0
        torch.testing.assert_close(f_loss, loss, msg=name)
        torch.testing.assert_close(f_grad, grad, msg=name)
        assert f_metrics.keys() == metrics.keys()
        for key in metrics:
            torch.testing.assert_close(f_metrics[key], metrics[key], msg=f"{name} {key}")


def test_a_nan_advantage_reaches_the_gradient():
    """As autograd's would: the learner's non-finite check must see it and skip the update."""
    batch = random_batch(4, seed=6)
    batch.advantages[0] = float("nan")
    for name in ("grpo", "calibrl"):
        logp = batch.old_logp.clone().requires_grad_()
        loss, _ = compute_loss(name, logp, batch)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(logp.grad).any(), name


def test_compiled_losses_do_not_recompile_per_batch():
    """A learner's micro-batches differ in rows, length and whole-batch normalisers: the compiled
    losses must take them all with the graphs of the first call (a recompile per micro-batch
    would cost seconds each)."""
    from calibrl.algo import compile_loss_kernels

    compile_loss_kernels()
    try:
        for i, (groups, seed) in enumerate([(3, 11), (5, 12), (4, 13)]):
            batch = random_batch(groups, seed=seed)
            # the first batch compiles; every later one must reuse its graphs
            with contextlib.nullcontext() if i == 0 else torch._dynamo.config.patch(error_on_recompile=True):
                for name in ("calibrl", "grpo"):
                    norms = loss_normalizers(name, batch)
                    norms = {key: value * (2 + i) for key, value in norms.items()}  # new floats each time
                    logp = batch.old_logp.clone().requires_grad_()
                    loss, _ = compute_loss(name, logp, batch, **norms)
                    loss.backward()
                    assert torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    finally:
        compile_loss_kernels(False)


def test_a_loss_the_compiler_cannot_build_runs_eagerly(caplog):
    """Where torch.compile fails (here a backend that raises, as inductor does without a C++
    compiler), the loss warns once, naming the cause, and gives eager mode's loss and gradient."""
    from calibrl.algo import compile_loss_kernels

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    batch = random_batch(4, seed=7)
    norms = loss_normalizers("calibrl", batch)

    def run():
        logp = batch.old_logp.clone().requires_grad_()
        loss, _ = compute_loss("calibrl", logp, batch, **norms)
        loss.backward()
        return loss.detach(), logp.grad

    eager = run()
    compile_loss_kernels(backend=broken_backend)
    try:
        with caplog.at_level("WARNING", logger="calibrl.algo.losses"):
            first, second = run(), run()
    finally:
        compile_loss_kernels(False)
    for loss, grad in (first, second):
        torch.testing.assert_close(loss, eager[0])
        torch.testing.assert_close(grad, eager[1])
    warnings = [r.getMessage() for r in caplog.records if r.name == "calibrl.algo.losses"]
    assert len(warnings) == 1, warnings
    assert "calibrl loss" in warnings[0] and "RuntimeError: no C++ compiler on this machine" in warnings[0]


# ---------------------------------------------------------------- padding and the compiled length


@pytest.mark.parametrize("name", NAMES)
def test_right_padding_changes_no_loss(name):
    """A learner pads a batch's response length to a multiple of 16 (`learner.pad_to_multiple_of`):
    every loss, gradient and metric must be the same (the padded positions get no gradient)."""
    batch = random_batch(6, seed=9, expert_in_baseline=name in ("luffy", "rlplus"))
    width = batch.response_ids.shape[1]
    padded = batch.pad_responses(16)
    assert padded.response_ids.shape[1] == 16 > width
    gen = torch.Generator().manual_seed(9)
    logp0 = (batch.old_logp + 0.5 * torch.randn(batch.old_logp.shape, generator=gen)).clamp(max=-1e-3)
    entropy0 = torch.rand(logp0.shape, generator=gen)
    # what a model computes on the padded positions is anything: make it far off
    extra = (len(batch), 16 - width)
    logp_padded = torch.cat([logp0, torch.full(extra, -7.0)], dim=1)
    entropy_padded = torch.cat([entropy0, torch.full(extra, 9.0)], dim=1)
    results = []
    for b, lp, ent in ((batch, logp0, entropy0), (padded, logp_padded, entropy_padded)):
        logp = lp.clone().requires_grad_()
        loss, metrics = compute_loss(name, logp, b, entropy=ent, entropy_coef=0.01, kl_coef=0.05,
                                     norm_length=20, **loss_normalizers(name, b))
        loss.backward()
        results.append((loss.detach(), logp.grad, metrics))
    (loss, grad, metrics), (p_loss, p_grad, p_metrics) = results
    assert grad.abs().sum() > 0
    torch.testing.assert_close(p_loss, loss)
    torch.testing.assert_close(p_grad[:, :width], grad)
    assert not p_grad[:, width:].any()
    assert p_metrics.keys() == metrics.keys()
    for key in metrics:
        torch.testing.assert_close(p_metrics[key], metrics[key], msg=key)


def _length_facts(calls):
    """A torch.compile backend that records, for each graph it is given, whether the compiler can prove
    the length of the graph's (B, T) inputs a multiple of 16 (what inductor asks before giving a
    Triton kernel the divisible-by-16 hint); it runs the graph uncompiled."""
    from torch._inductor.sizevars import SizeVarAllocator

    def backend(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        sizes = SizeVarAllocator(tensors[0].fake_mode.shape_env)
        lengths = [t.shape[1] for t in tensors if t.dim() == 2 and isinstance(t.shape[1], torch.SymInt)]
        calls.append(all(sizes.statically_known_multiple_of(n.node.expr, 16) for n in lengths)
                     if lengths else None)
        return gm
    return backend


@pytest.mark.parametrize("baseline", ["token", "sequence"])
def test_a_length_multiple_of_16_reaches_the_compiler(baseline):
    """`compile_loss_kernels(length_multiple=16)`: a batch padded to a multiple of 16 runs a graph that
    knows it (the GPU kernels' vector loads depend on it); any other length runs a graph that does
    not, and neither fails on the other's lengths."""
    from calibrl.algo import compile_loss_kernels

    calls = []
    batch = random_batch(5, seed=10)
    assert batch.response_ids.shape[1] % 16
    compile_loss_kernels(backend=_length_facts(calls), length_multiple=16)
    try:
        for b in (batch.pad_responses(16), batch, batch.pad_responses(32), batch.pad_responses(16)):
            logp = b.old_logp.clone().requires_grad_()
            loss, _ = compute_loss("calibrl", logp, b, baseline=baseline, **loss_normalizers("calibrl", b))
            loss.backward()
            assert torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    finally:
        compile_loss_kernels(False)
    # one graph knowing the multiple (T = 16, then 32 and 16 again without recompiling), one not
    assert calls == [True, False], calls
    with pytest.raises(ValueError, match="length_multiple"):
        compile_loss_kernels(length_multiple=0)


def test_each_loss_has_its_own_length_multiple_graphs():
    """The graphs that know the length multiple are kept per loss: the GRPO, CalibRL and PG kernels'
    wrappers must not share one compile cache (where each loss's first call would count as a
    recompile of another's, and all of them against one recompile limit)."""
    from calibrl.algo import compile_loss_kernels

    calls = []
    batch = random_batch(5, seed=10).pad_responses(16)
    compile_loss_kernels(backend=_length_facts(calls), length_multiple=16)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("calibrl", "grpo", "luffy", "calibrl", "grpo"):
                logp = batch.old_logp.clone().requires_grad_()
                loss, _ = compute_loss(name, logp, batch, **loss_normalizers(name, batch))
                loss.backward()
    finally:
        compile_loss_kernels(False)
    assert calls == [True, True, True], calls  # one graph per kernel, each knowing the multiple


def test_compiled_kernels_match_eager_at_a_known_length_multiple():
    """Inductor's kernels with the length stated a multiple of 16: the same loss, gradient and
    metrics as eager mode, on a padded batch (that graph) and an unpadded one (the other)."""
    from calibrl.algo import compile_loss_kernels

    batch = random_batch(4, seed=12)
    gen = torch.Generator().manual_seed(12)
    logp0 = (batch.old_logp + 0.4 * torch.randn(batch.old_logp.shape, generator=gen)).clamp(max=-1e-3)
    padded_logp = torch.nn.functional.pad(logp0, (0, 16 - logp0.shape[1]))
    cases = [(batch, logp0), (batch.pad_responses(16), padded_logp)]

    def run(b, lp):
        logp = lp.clone().requires_grad_()
        loss, metrics = compute_loss("calibrl", logp, b, **loss_normalizers("calibrl", b))
        loss.backward()
        return loss.detach(), logp.grad, metrics

    eager = [run(*case) for case in cases]
    compile_loss_kernels(length_multiple=16)
    try:
        fused = [run(*case) for case in cases]
    finally:
        compile_loss_kernels(False)
    for (loss, grad, metrics), (f_loss, f_grad, f_metrics) in zip(eager, fused):
        torch.testing.assert_close(f_loss, loss)
        torch.testing.assert_close(f_grad, grad)
        for key in metrics:
            torch.testing.assert_close(f_metrics[key], metrics[key], msg=key)
