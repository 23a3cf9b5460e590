"""DeepSpeed ZeRO learners in Ray actors (gloo on CPU): training lowers the loss, gradient
accumulation and data parallelism do not change the update, and exported weights serve in vLLM."""

import os

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from actors.group import ActorGroup
from actors.learner import Learner, gather_rank_rows
from calibrl.algo import CalibrationStage, ExpertTrajectory, Group, Response, Verdict, attach_expert_logprobs
from calibrl.algo.metrics import nonfinite_streak, reduce_rank_metrics
from calibrl.inputs import render_chat
from calibrl.tiny_models import build_tokenizer

pytestmark = pytest.mark.slow


def fixed_batch(num_groups=4, n=4, seed=0):
    """A deterministic batch: chat prompts, random on-policy responses (half pass), one expert each."""
    tok = build_tokenizer()
    rng = np.random.default_rng(seed)
    stage = CalibrationStage(pad_token_id=tok.pad_token_id, mixup="always")
    for g in range(num_groups):
        prompt = tok(render_chat(tok, f"What is {g} + {g + 1}? Think, then answer.")).input_ids
        responses, verdicts = [], []
        for i in range(n):
            ids = rng.integers(0, 256, size=int(rng.integers(4, 12))).tolist()
            responses.append(Response(token_ids=ids, logprobs=[-5.0] * len(ids), text="x"))
            ok = (i + g) % 2 == 0
            verdicts.append(Verdict(reward=1.1 if ok else 0.0, accuracy=float(ok), format_ok=ok, passed=ok))
        expert = f"<think>{g}+{g + 1}={2 * g + 1}</think><answer>{2 * g + 1}</answer>"
        experts = [ExpertTrajectory(token_ids=tok(expert).input_ids + [tok.eos_token_id], text=expert)]
        stage.add(Group(prompt_id=f"p{g}", prompt_token_ids=prompt, answer=str(2 * g + 1),
                        responses=responses, verdicts=verdicts, experts=experts))
    batch, _ = stage.assemble()
    return batch


def old_logprobs(learners, batch):
    results = ray.get(learners.run("compute_logprobs", batch))
    return gather_rank_rows(results, "logp", tuple(batch.response_ids.shape))


LOSS = {"clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": 3.0, "alpha": 0.5, "lam": 0.1, "agg": "token-mean"}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_train_and_loss_falls(ray_local, tiny_models, stage):
    learners = ActorGroup(Learner, 2, name_prefix=f"learner-z{stage}", num_cpus_per_actor=1,
                          model_path=tiny_models["tiny-qwen2"], zero_stage=stage, lr=3e-3,
                          micro_batch_per_device=3)
    try:
        batch = fixed_batch()
        attach_expert_logprobs(batch, old_logprobs(learners, batch))
        losses = []
        for _ in range(6):
            metrics = ray.get(learners.run("train_step", batch, loss_name="sft",
                                           loss_kwargs={"agg": "token-mean"}))
            losses.append(sum(m["loss/total"] for m in metrics))  # each rank holds its share
        assert losses[-1] < 0.8 * losses[0], losses
        # the CalibRL loss on the same batch falls too, and the weights the rollout engine would get changed
        before = ray.get(learners.run("full_state_dict"))[0]  # a collective under ZeRO-3: every rank calls it
        calib = [sum(m["loss/total"] for m in ray.get(learners.run("train_step", batch, loss_name="calibrl",
                                                                       loss_kwargs=LOSS))) for _ in range(4)]
        after = ray.get(learners.run("full_state_dict"))[0]
        assert calib[-1] < calib[0], calib
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        learners.shutdown()


def sgd_step_weights(tiny_models, ranks, micro, compile_loss=None, pad_to_multiple_of=None):
    name = f"learner-{ranks}x{micro}{'c' if compile_loss else ''}{pad_to_multiple_of or ''}"
    learners = ActorGroup(Learner, ranks, name_prefix=name,
                          num_cpus_per_actor=1, model_path=tiny_models["tiny-qwen2"], zero_stage=2, lr=0.5,
                          grad_clip=1e9, optimizer="sgd", micro_batch_per_device=micro,
                          compile_loss=compile_loss, pad_to_multiple_of=pad_to_multiple_of)
    try:
        batch = fixed_batch(num_groups=4, n=3, seed=1)  # 4 x (3 + 1 expert) = 16 rows
        assert batch.response_ids.shape[1] % 16  # so that padding to 16 pads
        attach_expert_logprobs(batch, old_logprobs(learners, batch) - 0.1)  # ratios away from 1
        metrics = ray.get(learners.run("train_step", batch, loss_name="calibrl", loss_kwargs=LOSS))
        # the fused loss ran (not the eager fallback) exactly where asked for
        assert [m["train/loss_compiled"] for m in metrics] == [float(bool(compile_loss))] * ranks
        return ray.get(learners.actors[0].full_state_dict.remote())
    finally:
        learners.shutdown()


def test_update_independent_of_micro_batches_and_ranks(ray_local, tiny_models):
    from safetensors.torch import load_file

    init = load_file(f"{tiny_models['tiny-qwen2']}/model.safetensors")
    one_rank = sgd_step_weights(tiny_models, ranks=1, micro=4)   # 16 rows: 1 rank x 4 micro-batches
    two_ranks = sgd_step_weights(tiny_models, ranks=2, micro=4)  # 8 rows per rank: 2 x 2 micro-batches
    # the learner's compiled loss (a CPU learner's default is eager), micro-batches of 3, 3 and 2 rows
    compiled = sgd_step_weights(tiny_models, ranks=2, micro=3, compile_loss=True)
    # a CUDA learner's defaults: the batch's response length padded to a multiple of 16, the compiled
    # loss told so
    padded = sgd_step_weights(tiny_models, ranks=1, micro=4, compile_loss=True, pad_to_multiple_of=16)
    moved = max((one_rank[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4  # the step did something
    for k in init:
        assert torch.allclose(one_rank[k], two_ranks[k], atol=1e-6, rtol=1e-4), k
        assert torch.allclose(one_rank[k], compiled[k], atol=1e-6, rtol=1e-4), k
        assert torch.allclose(one_rank[k], padded[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("ranks", [2, 4])
def test_zero3_log_probs_with_rows_that_do_not_divide_over_ranks(ray_local, tiny_models, ranks, tmp_path):
    """9 rows over 2 or 4 ZeRO-3 ranks at micro-batch 1: the ranks hold 5/4 or 3/2/2/2 rows, yet run
    the same number of forwards (ZeRO-3 gathers each layer from every rank), so nothing hangs; the
    log-probs equal one rank's. After an update, the weight export (each rank writing its partitions,
    no gather) equals the gathered weights."""
    batch = fixed_batch(num_groups=3, n=2)  # 3 x (2 + 1 expert) = 9 rows
    single = ActorGroup(Learner, 1, name_prefix=f"learner-z3ref{ranks}", num_cpus_per_actor=0.5,
                        model_path=tiny_models["tiny-qwen2"], zero_stage=3, micro_batch_per_device=1)
    try:
        expected = old_logprobs(single, batch)
        initial = ray.get(single.run("full_state_dict"))[0]
    finally:
        single.shutdown()
    learners = ActorGroup(Learner, ranks, name_prefix=f"learner-z3x{ranks}", num_cpus_per_actor=0.5,
                          model_path=tiny_models["tiny-qwen2"], zero_stage=3, lr=1e-3,
                          micro_batch_per_device=1)
    try:
        results = ray.get(learners.run("compute_logprobs", batch), timeout=240)  # a deadlock fails here
        got = gather_rank_rows(results, "logp", tuple(batch.response_ids.shape))
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        attach_expert_logprobs(batch, got)
        ray.get(learners.run("train_step", batch, loss_name="calibrl", loss_kwargs=LOSS), timeout=240)
        full = ray.get(learners.run("full_state_dict"), timeout=240)[0]  # the checkpoint's gather
        # the sync's export: no gather, each rank writes its partitions into the one file
        path = ray.get(learners.run("export_weights", 1, str(tmp_path)), timeout=240)[0]
        exported = load_file(os.path.join(path, "model.safetensors"))
        assert set(exported) == set(full)
        assert all(torch.equal(exported[k], v) for k, v in full.items())
        assert not all(torch.equal(exported[k], v) for k, v in initial.items())  # the update is in it
    finally:
        learners.shutdown()


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 takes the same check in DeepSpeed's stage-1/2 optimizer
def test_a_non_finite_update_is_not_applied(ray_local, tiny_models, stage):
    """A NaN advantage makes the loss and the gradient NaN: DeepSpeed's overflow check skips the step,
    the weights and Adam's state stay as they were, and the learner counts it; the next finite
    mini-batch updates as usual."""
    learners = ActorGroup(Learner, 2, name_prefix=f"learner-nan{stage}", num_cpus_per_actor=0.5,
                          model_path=tiny_models["tiny-qwen2"], zero_stage=stage, lr=1e-3,
                          micro_batch_per_device=2)
    try:
        batch = fixed_batch()
        attach_expert_logprobs(batch, old_logprobs(learners, batch))
        before = ray.get(learners.run("full_state_dict"))[0]
        poisoned = fixed_batch()
        attach_expert_logprobs(poisoned, old_logprobs(learners, poisoned))
        poisoned.advantages[0] = float("nan")
        m = reduce_rank_metrics(ray.get(learners.run("train_step", poisoned, loss_name="grpo",
                                                     loss_kwargs=LOSS)))
        counts = (m["train/nonfinite_updates"], m["train/nonfinite_trailing"], m["train/updates_applied"])
        assert counts == (1, 1, 0)
        after = ray.get(learners.run("full_state_dict"))[0]
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved, nothing NaN
        m = reduce_rank_metrics(ray.get(learners.run("train_step", batch, loss_name="grpo",
                                                     loss_kwargs=LOSS)))
        assert (m["train/nonfinite_updates"], m["train/updates_applied"]) == (0, 1)
        moved = ray.get(learners.run("full_state_dict"))[0]
        assert all(torch.isfinite(v).all() for v in moved.values())
        assert any(not torch.equal(before[k], moved[k]) for k in before)
    finally:
        learners.shutdown()


def test_nonfinite_streak():
    assert nonfinite_streak(0, {"train/nonfinite_updates": 2, "train/nonfinite_trailing": 1,
                                "train/updates_applied": 3}) == 1  # an applied update ended the old streak
    assert nonfinite_streak(1, {"train/nonfinite_updates": 2, "train/updates_applied": 0}) == 3
    assert nonfinite_streak(3, {"train/nonfinite_updates": 0, "train/updates_applied": 4}) == 0
