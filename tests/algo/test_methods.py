"""The method table, `has_signal`, the calibration ablations, averaged expert baselines, step metrics."""

import pytest
import torch

from calibrl.algo import METHODS, TrainBatch, attach_expert_logprobs, calibrl_loss, compute_loss, has_signal
from calibrl.algo.metrics import gradient_shares, greedy_change_rate, reduce_rank_metrics
from calibrl.config import Config, ConfigError, validate

from ._random_batch import random_batch


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_every_method_has_a_consistent_entry():
    for name, m in METHODS.items():
        assert m.loss_rows in ("on_policy", "expert", "all"), name
        assert m.needs_rollouts or m.loss_rows == "expert", name  # no rollouts: nothing but experts to learn
        assert not m.expert_in_baseline or m.expert_rows, name
        batch = random_batch(4, seed=1, expert_in_baseline=m.expert_in_baseline, mixup="always")
        loss, metrics = compute_loss(name, batch.old_logp.clone().requires_grad_(), batch, clip_high=0.28,
                                     alpha=0.5, lam=0.1)
        assert torch.isfinite(loss) and "loss" in metrics


def test_compute_loss_rejects_an_unknown_knob():
    batch = random_batch(2, seed=0)
    with pytest.raises(TypeError, match="alpah"):
        compute_loss("calibrl", batch.old_logp, batch, alpah=0.5)


def test_unknown_method_is_a_config_error_listing_the_table():
    cfg = Config()
    cfg.algorithm.name = "ppo"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert all(name in str(e.value) for name in METHODS)


def _adv_batch(advantages: list[float], is_expert: list[bool]) -> TrainBatch:
    batch = random_batch(1, seed=3, n=len(advantages) - sum(is_expert), mixup="always")
    assert batch.is_expert.tolist() == is_expert
    batch.advantages = torch.tensor(advantages)
    return batch


def test_has_signal_only_when_some_loss_row_has_an_advantage():
    zero = _adv_batch([0.0, 0.0, 0.0, 0.0, 0.7], [False] * 4 + [True])  # only the expert row: not a PG row
    assert not has_signal("calibrl", zero) and not has_signal("grpo", zero)
    assert has_signal("luffy", zero)  # LUFFY trains on the expert row
    assert has_signal("sft", zero)  # SFT needs no advantage
    assert has_signal("calibrl", zero, entropy_coef=0.01) and has_signal("calibrl", zero, kl_coef=0.1)
    some = _adv_batch([0.0, 0.5, 0.0, 0.0, 0.0], [False] * 4 + [True])
    assert has_signal("calibrl", some)


# ------------------------------------------------------------------ calibration ablations


def _one_passing_row(**kw):
    # one passing on-policy row, A = 0.25, logp above the expert baseline by 1 at both tokens
    logp = t([[-1.0, -2.0]])
    args = (logp.clone(), t([0.25]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([False]),
            torch.tensor([True]), t([[-2.0, -3.0]]))
    return calibrl_loss(logp, *args, alpha=0.5, **kw)[1]["calib_loss"].item()


def test_calib_weight_unit_drops_the_advantage_factor():
    # z = -s d = -1 on both tokens: slope alpha -> g = |A| * 0.5 * -1 = -0.125; unit weight: -0.5
    assert _one_passing_row() == pytest.approx(-0.125)
    assert _one_passing_row(calib_weight="unit") == pytest.approx(-0.5)


def test_unit_weight_acts_on_zero_advantage_groups():
    logp = t([[-1.0]])
    args = (logp.clone(), t([0.0]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([False]),
            torch.tensor([True]), t([[-3.0]]))
    assert calibrl_loss(logp, *args)[1]["calib_loss"].item() == 0.0
    assert (calibrl_loss(logp, *args, calib_weight="unit", alpha=0.5)[1]["calib_loss"].item()
            == pytest.approx(-1.0))


@pytest.mark.parametrize(("alpha", "want"), [(0.0, 0.0), (1.0, -0.25)])  # ReLU, identity
def test_relu_and_identity_are_alpha_zero_and_one(alpha, want):
    logp = t([[-1.0, -2.0]])
    args = (logp.clone(), t([0.25]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([False]),
            torch.tensor([True]), t([[-2.0, -3.0]]))
    assert calibrl_loss(logp, *args, alpha=alpha)[1]["calib_loss"].item() == pytest.approx(want)


def test_no_expert_baseline_zero_gives_dropped_rows_b_equal_zero():
    # row 0 kept its expert (b = -2), row 1 did not (its b column is zero, as attach_expert_logprobs
    # leaves it)
    logp = t([[-1.0], [-1.0]])
    args = (logp.clone(), t([-0.5, -0.5]), torch.ones(2, 1, dtype=torch.bool), torch.tensor([False, False]),
            torch.tensor([False, False]), t([[-2.0], [0.0]]))
    has = torch.tensor([True, False])
    # failing rows: z = d. row 0: d = 1 -> 0.5 * 1; row 1 with b = 0: d = -1 -> 0.5 * 0.5 * -1
    none = calibrl_loss(logp, *args, has_expert=has)[1]["calib_loss"].item()
    zero = calibrl_loss(logp, *args, has_expert=has, no_expert_baseline="zero")[1]["calib_loss"].item()
    assert none == pytest.approx(0.5 / 2)
    assert zero == pytest.approx((0.5 - 0.25) / 2)
    with pytest.raises(ValueError, match="no_expert_baseline"):
        calibrl_loss(logp, *args, no_expert_baseline="first")


def test_two_experts_average_where_both_reach_and_one_past_the_shorter():
    batch = random_batch(1, seed=4, n=2, experts=2, experts_per_group=2, mixup="always")
    assert batch.is_expert.tolist() == [False, False, True, True]
    width = batch.response_ids.shape[1]
    old = -torch.arange(1, 4 * width + 1, dtype=torch.float32).reshape(4, width) / 10
    batch = attach_expert_logprobs(batch, old)
    lengths = batch.response_length.tolist()
    for pos in range(width):
        reach = [old[e, pos].item() for e in (2, 3) if pos < lengths[e]]
        want = sum(reach) / len(reach) if reach else 0.0
        assert batch.expert_old_logp[0, pos].item() == pytest.approx(want)
    means = [old[e, :lengths[e]].mean().item() for e in (2, 3)]
    assert batch.expert_mean_logp[1].item() == pytest.approx(sum(means) / 2)


# ------------------------------------------------------------------ step metrics


def test_reduce_rank_metrics_sums_shares_and_takes_the_max_of_common_values():
    got = reduce_rank_metrics([{"loss/pg": 0.25, "train/grad_norm": 2.0, "time/train_rank_s": 3.0},
                               {"loss/pg": 0.5, "train/grad_norm": 2.0, "time/train_rank_s": 5.0}])
    assert got == {"loss/pg": 0.75, "train/grad_norm": 2.0, "time/train_rank_s": 5.0}


def test_gradient_share_and_greedy_change_rate():
    assert (gradient_shares({"train/grad_sq_pg": 9.0, "train/grad_sq_calib": 1.0})
            == {"grad/calib_share": 0.25})
    assert gradient_shares({"train/grad_sq_pg": 9.0}) == {}
    assert greedy_change_rate({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "5", "d": "7"}) == 0.5


def test_diagnostics_report_each_terms_gradient_norm():
    batch = random_batch(3, seed=2, mixup="always")
    logp = (batch.old_logp + 0.1).requires_grad_()
    _, m = compute_loss("calibrl", logp, batch, lam=0.1, diagnostics=True)
    loss_pg, _ = compute_loss("calibrl", logp, batch, lam=0.0)
    (g_pg,) = torch.autograd.grad(loss_pg, logp)
    assert m["grad_sq_pg"].item() == pytest.approx(g_pg.pow(2).sum().item(), rel=1e-5)
    assert m["grad_sq_calib"].item() > 0


def test_paired_gain_hand_worked():
    from calibrl.algo.metrics import paired_gain

    before = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0}
    after = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 1.0}  # e was not evaluated before: ignored
    gain, half = paired_gain(before, after)
    # diffs 1, 0, 1, 0: mean 0.5, sample var 1/3, se = sqrt(1/12)
    assert gain == pytest.approx(0.5)
    assert half == pytest.approx(1.96 * (1 / 12) ** 0.5)
