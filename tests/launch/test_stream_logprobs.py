"""Old log-probs computed chunk by chunk while the step generates land on the right rows of the step's
batch, whatever the experts mixup kept (`trainer.stream_logprobs`)."""

import torch

from calibrl.algo import CalibrationStage
from launch.rollout_stream import LogprobPart, gather_parts, place_rows, row_keys
from tests.algo._random_batch import random_groups


def per_token(batch):
    """A stand-in for log-probs: depends on the row's tokens and their positions."""
    return torch.cumsum(batch.response_ids.float(), dim=1) * 1e-3 + batch.is_expert.float().unsqueeze(-1)


def scored_chunks(groups, sizes):
    """Each chunk as the stream sends it (every expert), scored by two learner ranks."""
    parts, results, first = [], [], 0
    for size in sizes:
        stage = CalibrationStage(pad_token_id=0, mixup="always", experts_per_group=2)
        for group in groups[first:first + size]:
            stage.add(group)
        batch, _ = stage.assemble()
        rows = torch.arange(len(batch))
        ranks = [{"rows": rows[r::2], "logp": per_token(batch)[r::2], "entropy": -per_token(batch)[r::2]}
                 for r in range(2)]
        parts.append(LogprobPart(keys=row_keys(batch, first), shape=tuple(batch.response_ids.shape), refs=[]))
        results.append(ranks)
        first += size
    return parts, results


def test_chunk_log_probs_land_on_the_step_rows():
    groups = random_groups(5, n=3, experts=2, seed=0)
    stage = CalibrationStage(pad_token_id=0, mixup="random", mix_ratio=0.5, experts_per_group=2, seed=3)
    for group in groups:
        stage.add(group)
    batch, _ = stage.assemble()
    kept = int(batch.is_expert.sum())
    assert 0 < kept < 10  # the mixup dropped some experts, kept others
    parts, results = scored_chunks(groups, [2, 2, 1])
    placed = place_rows(parts, batch)
    shape = tuple(batch.response_ids.shape)
    mask = batch.response_mask
    torch.testing.assert_close(gather_parts(parts, placed, results, shape, "logp") * mask,
                               per_token(batch) * mask)
    torch.testing.assert_close(gather_parts(parts, placed, results, shape, "entropy") * mask,
                               -per_token(batch) * mask)


def test_rows_no_chunk_scored_mean_scoring_the_batch_whole():
    groups = random_groups(5, n=3, experts=2, seed=1)
    stage = CalibrationStage(pad_token_id=0, mixup="always", experts_per_group=2)
    for group in groups:
        stage.add(group)
    batch, _ = stage.assemble()
    parts, _ = scored_chunks(groups, [2, 2])  # the last group's chunk is missing
    assert place_rows(parts, batch) is None
    assert place_rows([], batch) is None


def test_streaming_with_multi_threaded_actors_beyond_the_cores_is_flagged(monkeypatch):
    import ray

    from calibrl.config import load_config
    from launch.train import oversubscribed

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = load_config(None, ["rollout.num_cpus_per_worker=2", "learner.num_cpus_per_learner=2"])
    assert oversubscribed(cfg)
    cfg.trainer.stream_logprobs = False  # the phases take turns
    assert not oversubscribed(cfg)
    single = load_config(None, ["rollout.num_workers=2", "learner.num_learners=2",
                                "rollout.num_cpus_per_worker=0.5", "learner.num_cpus_per_learner=0.5"])
    assert not oversubscribed(single)  # one thread each: time-shared, no spinning teams
