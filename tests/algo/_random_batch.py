"""Random groups and batches for the algorithm tests (seeded; small)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import torch

from calibrl.algo import (
    CalibrationStage,
    ExpertTrajectory,
    Group,
    Response,
    TrainBatch,
    Verdict,
    attach_expert_logprobs,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_reference_loop():
    """benchmarks/reference_loop.py (the per-sample reference of the calibration stage)."""
    spec = importlib.util.spec_from_file_location("reference_loop", ROOT / "benchmarks" / "reference_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verdict(accuracy: float, format_ok: bool) -> Verdict:
    reward = accuracy + 0.1 * format_ok
    return Verdict(reward=reward, accuracy=accuracy, format_ok=format_ok, passed=reward > 0.1)


def random_groups(num_groups: int, *, n: int = 4, max_len: int = 12, experts: int = 1, seed: int = 0,
                  as_lists: bool = False, vocab: int = 50) -> list[Group]:
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num_groups):
        responses, verdicts = [], []
        mode = rng.integers(4)  # 0: all fail, 1: all pass, else mixed
        for _ in range(n):
            length = int(rng.integers(1, max_len + 1))
            ids = rng.integers(3, vocab, size=length)
            lp = -rng.random(length).astype(np.float32) * 3
            responses.append(Response(token_ids=ids.tolist() if as_lists else ids,
                                      logprobs=lp.tolist() if as_lists else lp, text="",
                                      finish_reason="length" if length == max_len else "stop",
                                      weights_version=int(rng.integers(3))))
            acc = 0.0 if mode == 0 else 1.0 if mode == 1 else float(rng.random() < 0.5)
            verdicts.append(verdict(acc, bool(rng.random() < 0.8)))
        exps = [ExpertTrajectory(token_ids=rng.integers(3, vocab, size=int(rng.integers(1, max_len + 1))),
                                 text="") for _ in range(experts)]
        prompt = rng.integers(3, vocab, size=int(rng.integers(1, 6)))
        groups.append(Group(prompt_id=f"p{g}", prompt_token_ids=prompt, answer="1", responses=responses,
                            verdicts=verdicts, experts=exps, images=[b"img%d" % g]))
    return groups


def random_batch(num_groups: int = 6, *, seed: int = 0, std_normalize: bool = False, mixup: str = "random",
                 mix_ratio: float = 0.7, expert_in_baseline: bool = False, experts: int = 1,
                 experts_per_group: int = 1, n: int = 4) -> TrainBatch:
    """A stage-assembled batch with random old log-probs attached."""
    stage = CalibrationStage(pad_token_id=0, mixup=mixup, mix_ratio=mix_ratio, std_normalize=std_normalize,
                             expert_in_baseline=expert_in_baseline, experts_per_group=experts_per_group,
                             seed=seed)
    for g in random_groups(num_groups, seed=seed, experts=experts, n=n):
        stage.add(g)
    batch, _ = stage.assemble()
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch.response_ids.shape, generator=gen) * 3
    return attach_expert_logprobs(batch, old)
