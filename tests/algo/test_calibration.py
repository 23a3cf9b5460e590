"""The calibration stage, the TrainBatch and section 4's expert baseline (attach_expert_logprobs)."""

import numpy as np
import pytest
import torch

from calibrl.algo import (
    MIXUP_POLICIES,
    CalibrationStage,
    ExpertTrajectory,
    Group,
    Response,
    TrainBatch,
    attach_expert_logprobs,
)

from ._random_batch import load_reference_loop, random_groups, verdict

REF = load_reference_loop()
TENSOR_FIELDS = ["prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logp", "rewards",
                 "advantages", "accuracy", "format_ok", "passed", "is_expert", "group_index", "has_expert",
                 "expert_row", "response_length", "weights_version"]


def assert_batch_matches_reference(batch, ref):
    for name in TENSOR_FIELDS + ["old_logp", "expert_old_logp", "expert_mean_logp"]:
        if name in ref:
            got, want = getattr(batch, name), ref[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if got.dtype.is_floating_point:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert torch.equal(got, want), name


CONFIGS = [
    {},
    {"std_normalize": True},
    {"mixup": "random", "mix_ratio": 0.5, "seed": 3},
    {"mixup": "pass", "pass_low": 0.2, "pass_high": 0.6},
    {"mixup": "never"},
    {"mixup": "always", "experts_per_group": 2, "expert_in_baseline": True},
    {"dynamic_sampling": True, "max_groups": 5},
    {"max_response_length": 12, "overlong_buffer_tokens": 4, "overlong_penalty": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("as_lists", [False, True])
def test_stage_matches_per_sample_loop(config, as_lists):
    groups = random_groups(12, seed=1, experts=2, as_lists=as_lists)
    config = dict(config)
    max_groups = config.pop("max_groups", None)
    stage = CalibrationStage(pad_token_id=1, **config)
    for g in groups:
        stage.add(g)
    batch, metrics = stage.assemble(max_groups=max_groups)
    ref = REF.reference_assemble(groups, pad_token_id=1, max_groups=max_groups, **config)
    assert_batch_matches_reference(batch, ref)
    old = -torch.rand(batch.response_ids.shape, generator=torch.Generator().manual_seed(0))
    attach_expert_logprobs(batch, old)
    assert_batch_matches_reference(batch, REF.reference_attach(ref, old))
    assert metrics["rows"] == len(batch)


def test_expert_shorter_and_longer_than_responses_hand_worked():
    lp = np.array([-0.1, -0.2, -0.3, -0.4], dtype=np.float32)
    group = Group(prompt_id="q", prompt_token_ids=[5, 6], answer="1",
                  responses=[Response(token_ids=[7, 8, 9, 10], logprobs=lp, text=""),
                             Response(token_ids=[7], logprobs=lp[:1], text="")],
                  verdicts=[verdict(1.0, True), verdict(0.0, True)],
                  experts=[ExpertTrajectory(token_ids=[11, 12, 13], text="")])
    stage = CalibrationStage(pad_token_id=0)
    stage.add(group)
    batch, _ = stage.assemble()
    assert batch.response_ids.tolist() == [[7, 8, 9, 10], [7, 0, 0, 0], [11, 12, 13, 0]]
    assert batch.prompt_ids.tolist() == [[5, 6]] * 3
    assert batch.expert_row.tolist() == [2, 2, 2]
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, 9.0, 9.0, 9.0], [-0.5, -1.5, -2.5, 99.0]])
    attach_expert_logprobs(batch, old)
    # the expert (length 3) is shorter than response 0 (length 4): b = 0 past its end
    assert batch.expert_old_logp[0].tolist() == [-0.5, -1.5, -2.5, 0.0]
    # and longer than response 1 (length 1): only position 0 is ever used by its loss
    assert batch.expert_old_logp[1].tolist() == [-0.5, -1.5, -2.5, 0.0]
    assert batch.expert_mean_logp.tolist() == pytest.approx([-1.5, -1.5, -1.5])
    assert batch.old_logp[1].tolist() == [-1.0, 0.0, 0.0, 0.0]  # padding zeroed
    # rewards 1.1, 0.1, expert 1.1; advantages over the two on-policy rows only
    assert batch.advantages.tolist() == pytest.approx([0.5, -0.5, 0.5])


def test_left_padded_prompts_and_rollout_logp():
    groups = random_groups(3, seed=2)
    stage = CalibrationStage(pad_token_id=0, mixup="always")
    for g in groups:
        stage.add(g)
    batch, _ = stage.assemble()
    for i in range(len(batch)):
        g = groups[int(batch.group_index[i])]
        n = len(g.prompt_token_ids)
        assert batch.prompt_mask[i].tolist() == [False] * (batch.prompt_ids.shape[1] - n) + [True] * n
        assert batch.prompt_ids[i, -n:].tolist() == list(g.prompt_token_ids)
        if batch.is_expert[i]:
            assert (batch.rollout_logp[i] == 0).all()
    assert (batch.old_logp == 0).all() and (batch.expert_old_logp == 0).all()


def test_dynamic_sampling_counts_and_filters():
    groups = random_groups(20, seed=4)
    stage = CalibrationStage(pad_token_id=0, dynamic_sampling=True)
    for g in groups:
        stage.add(g)
    rates = [sum(v.passed for v in g.verdicts) / len(g.verdicts) for g in groups]
    informative = sum(0 < r < 1 for r in rates)
    assert stage.num_groups == 20 and stage.num_informative == informative
    batch, m = stage.assemble()
    assert m["groups"] == informative
    assert (m["groups_all_pass"] == sum(r == 1 for r in rates)
            and m["groups_all_fail"] == sum(r == 0 for r in rates))
    assert 0 < m["groups_all_pass"] and 0 < m["groups_all_fail"]
    kept_rates = [rates[int(g[1:])] for g in dict.fromkeys(batch.row_prompt_id)]
    assert all(0 < r < 1 for r in kept_rates)


def test_random_mixup_is_seeded_and_keeps_about_mix_ratio():
    def kept(seed):
        stage = CalibrationStage(pad_token_id=0, mixup="random", mix_ratio=0.3, seed=seed)
        for g in random_groups(200, seed=5, n=2, max_len=3):
            stage.add(g)
        return stage.assemble()[1]["expert_kept_frac"]
    assert kept(0) == kept(0)
    assert 0.2 < kept(0) < 0.4
    assert kept(0) != kept(1)


def test_mixup_policies():
    rate = torch.tensor([0.0, 0.25, 0.5, 1.0])
    u = torch.tensor([0.1, 0.6, 0.3, 0.9])
    kw = {"mix_ratio": 0.5, "pass_low": 0.2, "pass_high": 0.5}
    assert MIXUP_POLICIES["random"](rate, u, **kw).tolist() == [True, False, True, False]
    assert MIXUP_POLICIES["pass"](rate, u, **kw).tolist() == [False, True, True, False]
    assert MIXUP_POLICIES["always"](rate, u, **kw).tolist() == [True] * 4
    assert MIXUP_POLICIES["never"](rate, u, **kw).tolist() == [False] * 4


def test_select_split_and_roundtrip():
    stage = CalibrationStage(pad_token_id=0, mixup="always")
    for g in random_groups(4, seed=6):
        stage.add(g)
    batch, _ = stage.assemble()
    attach_expert_logprobs(batch, -torch.rand(batch.response_ids.shape))
    pieces = batch.split(3)
    assert sum(len(p) for p in pieces) == len(batch)
    assert torch.equal(torch.cat([p.expert_old_logp for p in pieces]), batch.expert_old_logp)
    # expert_row is re-pointed into the piece, -1 where the expert row is elsewhere
    idx = torch.tensor([4, 0, 1])  # group 0's expert row is 4
    sub = batch.select(idx)
    assert batch.expert_row[0] == 4 and sub.expert_row.tolist() == [0, 0, 0]
    sub = batch.select(torch.tensor([1, 2]))
    assert sub.expert_row.tolist() == [-1, -1] and sub.has_expert.all()
    with pytest.raises(ValueError, match="before splitting"):
        attach_expert_logprobs(sub, torch.zeros(sub.response_ids.shape))
    again = TrainBatch.from_dict(batch.to_dict())
    assert torch.equal(again.response_ids, batch.response_ids) and again.prompt_images == batch.prompt_images
    assert len(batch.prompt_images) == len(batch) and batch.row_prompt_id[0] == "p0"


def test_input_validation_and_single_use():
    stage = CalibrationStage(pad_token_id=0)
    bad = Group(prompt_id="bad", prompt_token_ids=[1], answer="1",
                responses=[Response(token_ids=[1, 2], logprobs=[-1.0], text="")],
                verdicts=[verdict(1.0, True)])
    with pytest.raises(ValueError, match="bad"):
        stage.add(bad)
    with pytest.raises(ValueError, match="verdicts"):
        stage.add(Group(prompt_id="x", prompt_token_ids=[1], answer="1", responses=[], verdicts=[]))
    with pytest.raises(ValueError):
        CalibrationStage(pad_token_id=0, mixup="sometimes")
    stage.assemble()
    with pytest.raises(RuntimeError):
        stage.add(random_groups(1)[0])


def test_empty_after_dynamic_sampling():
    stage = CalibrationStage(pad_token_id=0, dynamic_sampling=True)
    group = random_groups(1, seed=0)[0]
    group.verdicts = [verdict(1.0, True)] * len(group.verdicts)
    stage.add(group)
    batch, m = stage.assemble()
    assert len(batch) == 0 and m["groups_dropped"] == 1


def test_pad_responses_pads_token_fields_on_the_right():
    stage = CalibrationStage(pad_token_id=0, mixup="always")
    for g in random_groups(3, seed=8, max_len=12):
        stage.add(g)
    batch, _ = stage.assemble()
    batch = attach_expert_logprobs(batch, -torch.rand(batch.response_ids.shape) - 0.1)
    width = batch.response_ids.shape[1]
    assert width % 16 != 0
    padded = batch.pad_responses(16)
    assert padded.response_ids.shape == (len(batch), 16)
    for name in ("response_ids", "response_mask", "rollout_logp", "old_logp", "expert_old_logp"):
        old, new = getattr(batch, name), getattr(padded, name)
        assert new.dtype == old.dtype and new.shape == (len(batch), 16), name
        assert torch.equal(new[:, :width], old), name
        assert not new[:, width:].any(), name  # 0 / False: padding
    for name in ("prompt_ids", "advantages", "passed", "expert_row", "response_length"):
        assert torch.equal(getattr(padded, name), getattr(batch, name)), name
    assert padded.prompt_images == batch.prompt_images
    # already a multiple: the batch itself
    assert padded.pad_responses(16) is padded and batch.pad_responses(1) is batch
    assert padded.pad_responses(8) is padded and padded.pad_responses(5).response_ids.shape[1] == 20
