"""RL must learn, not only run: with the real verifier, a tiny model that solves a small task some of
the time after a short SFT warm-up improves its training reward and its held-out greedy accuracy
under GRPO and under CalibRL (seeded; the whole module takes a few minutes on 2 CPU cores).

The task is the demo's single-digit arithmetic ("What is 7 + 5?"): after the warm-up the model
has the format and a part of the table (0.086 on these 128 held-out prompts, pass@4 about 30%), so
on-policy samples are sometimes right and the group advantages carry a signal that generalises to
held-out prompts. (The image-counting tasks do not: see docs/results/README.md.) GRPO runs with 8
prompts per step, CalibRL with 16: at 16 prompts GRPO moved +0.007 in 30 steps on this seed, and
CalibRL at 8 moved +0.016 (docs/results/README.md).
"""

import os

import pytest

from calibrl.config import load_config
from calibrl.data.synthetic import write_splits
from launch.metrics import read_metrics
from launch.train import Trainer

pytestmark = pytest.mark.slow

SFT_STEPS = 150
RL = {  # per method, the RL phase at a setting where it learns here (one seed each, measured)
    "grpo": ["algorithm.name=grpo", "algorithm.std_normalize=true", "algorithm.mixup=never",
             "trainer.prompts_per_step=8", "learner.mini_batch_prompts=8"],
    "calibrl": ["algorithm.name=calibrl", "trainer.prompts_per_step=16", "learner.mini_batch_prompts=16"],
}
RL_COMMON = ["trainer.total_steps=30", "learner.lr=2e-4"]
MIN_GAIN = 0.04  # held-out greedy accuracy over the SFT start, on 128 prompts (measured: +0.086 both)


def base(tiny_models, data_dir, out, *extra):
    return [f"model.path={tiny_models['tiny-qwen2.5-vl']}", "model.max_model_len=512",
            f"data.train_files=[{data_dir}/train.parquet]", f"data.val_files=[{data_dir}/val.parquet]",
            "data.max_prompt_length=400", "rollout.samples_per_prompt=8", "rollout.max_response_length=48",
            "rollout.kv_cache_memory_mib=128", "rollout.stream_chunk_prompts=4",
            "learner.micro_batch_per_device=16", "trainer.sft_batch_prompts=16",
            "trainer.eval_max_prompts=128", "trainer.eval_pass_k=4", "trainer.save_every_steps=0",
            "trainer.resume=never", f"trainer.output_dir={out}", *extra]


def fit(cfg) -> list[dict]:
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    return read_metrics(cfg.trainer.output_dir)


@pytest.fixture(scope="module")
def warm_start(ray_local, tiny_models, tmp_path_factory):
    """(data dir, the SFT-warmed model directory, its held-out accuracy)."""
    root = tmp_path_factory.mktemp("learning")
    data = str(root / "data")
    write_splits(data, n_train=2000, n_val=128, n_test=2, seed=0, multimodal=False, difficulty=1)
    out = str(root / "sft")
    records = fit(load_config(None, base(tiny_models, data, out, "algorithm.name=sft",
                                         f"trainer.total_steps={SFT_STEPS}", "learner.lr=2e-3",
                                         "trainer.eval_every_steps=0")))
    acc = [r for r in records if r["kind"] == "eval"][-1]["val/accuracy"]
    model = os.path.join(out, "checkpoints", f"step_{SFT_STEPS:06d}", "learner", "hf")
    return data, model, acc


def test_the_warm_start_leaves_room_to_learn(warm_start):
    _, _, acc = warm_start
    assert 0.03 <= acc <= 0.4, acc  # some prompts right, most wrong: RL has something to do


CALIBRL_FORMAT_COLLAPSE = pytest.mark.xfail(strict=True, reason=(
    "CalibRL's training reward falls (0.188 -> 0.081, first vs last 10 steps) while its held-out accuracy "
    "rises: the sampled format rate collapses to 0.05 at steps 22-27, eroded by the asymmetric calibration "
    "term (docs/results/README.md). Strict: a fix makes this test fail loudly, so the mark gets removed."))
_runs: dict[str, list[dict]] = {}


@pytest.fixture
def rl_records(warm_start, tiny_models, tmp_path_factory):
    """The records of method's RL run from the warm start (each method trained once per session)."""
    def get(method: str) -> list[dict]:
        if method not in _runs:
            data, model, _ = warm_start
            out = str(tmp_path_factory.mktemp(method))
            overrides = base(tiny_models, data, out, f"model.path={model}", "trainer.eval_every_steps=0",
                             *RL_COMMON, *RL[method])
            _runs[method] = fit(load_config(None, overrides))
        return _runs[method]
    return get


@pytest.mark.parametrize("method", list(RL))
def test_rl_raises_held_out_accuracy(rl_records, method):
    records = rl_records(method)
    evals = [r for r in records if r["kind"] == "eval"]
    start, end = evals[0]["val/accuracy"], evals[-1]["val/accuracy"]
    assert end >= start + MIN_GAIN, (method, start, end)
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["train/update_norm"] > 0 for r in train if r.get("train/skipped_updates", 0) == 0)


@pytest.mark.parametrize("method", [m if m != "calibrl" else pytest.param(m, marks=CALIBRL_FORMAT_COLLAPSE)
                                    for m in RL])
def test_rl_raises_training_reward(rl_records, method):
    train = [r for r in rl_records(method) if r["kind"] == "train"]
    first, last = train[:10], train[-10:]
    reward_first = sum(r["reward/mean"] for r in first) / len(first)
    reward_last = sum(r["reward/mean"] for r in last) / len(last)
    assert reward_last > reward_first, (method, reward_first, reward_last)
