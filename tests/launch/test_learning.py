"""RL must learn, not only run: with the real verifier, a tiny model that solves a small task some of
the time after an SFT warm-up improves its training reward and its held-out greedy accuracy under
GRPO and under CalibRL (seeded; the module takes about seven minutes on 2 CPU cores: 7 min 4 s alone).

The task is the demo's single-digit arithmetic ("What is 7 + 5?"). The warm-up is long enough for
the model to read its prompt (350 steps: `val/prompt_dependence` about 0.5 nats/token; after 150
steps it was under 0.1, answering from the marginal distribution whatever it was asked, and no RL
method could raise held-out accuracy). In the demo (seed 0) it is then right on 0.430 of 256
held-out prompts, pass@4 0.62, on the machine of 2026-12-05 (AVX-512 kernels; a clean clone at
ab26bb5), and on 0.297, pass@4 0.50, on that of 2026-12-03 (c2563e3): the warm start depends on the
CPU's vector kernels (README, "What the demo does"). Either way the group advantages carry a signal
that carries over to held-out prompts; on this test's data, 0.297 of 128 on the 2026-12-03 machine.
The RL phase is the demo's: 20 steps, each sampling 64 prompts x 4 and taking 4 updates of 16
prompts.

Why 20 steps and not 10: from this warm start, 10 steps moved held-out accuracy by -0.031 to +0.094
over three run seeds (CalibRL +0.008, +0.094, -0.031; GRPO +0.047, +0.070, +0.008), with the
training reward still flat; the reward starts rising after about step 10, and at 20 steps CalibRL
gained +0.211 and +0.156, GRPO +0.070 and +0.141 (seeds 0 and 2; the test runs seed 0). Runs are
deterministic on one machine, and the 10-step test failed CalibRL here (+0.008) on code that CI had
passed: it went by the machine's rounding.
"""

import os

import pytest

from calibrl.config import load_config
from calibrl.data.synthetic import write_splits
from launch.metrics import read_metrics
from launch.train import Trainer

pytestmark = pytest.mark.slow

SFT_STEPS = 350
RL = {"grpo": ["algorithm.name=grpo"], "calibrl": ["algorithm.name=calibrl"]}
RL_COMMON = ["trainer.total_steps=20", "learner.lr=2e-4", "trainer.prompts_per_step=64",
             "rollout.samples_per_prompt=4", "learner.mini_batch_prompts=16"]
MIN_GAIN = 0.04  # held-out greedy accuracy over the SFT start, on the first 128 held-out prompts


def base(tiny_models, data_dir, out, *extra):
    return [f"model.path={tiny_models['tiny-qwen2.5-vl']}", "model.max_model_len=512",
            f"data.train_files=[{data_dir}/train.parquet]", f"data.val_files=[{data_dir}/val.parquet]",
            "data.max_prompt_length=400", "rollout.max_response_length=48",
            "rollout.kv_cache_memory_mib=128", "rollout.stream_chunk_prompts=4",
            "learner.micro_batch_per_device=16", "trainer.sft_batch_prompts=16",
            "trainer.eval_max_prompts=128", "trainer.eval_pass_k=0", "trainer.save_every_steps=0",
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
    final = [r for r in records if r["kind"] == "eval"][-1]
    model = os.path.join(out, "checkpoints", f"step_{SFT_STEPS:06d}", "learner", "hf")
    return data, model, final


def test_the_warm_start_reads_its_prompt_and_leaves_room_to_learn(warm_start):
    _, _, final = warm_start
    assert final["val/prompt_dependence"] > 0.2, final  # its answers depend on what it is asked
    assert 0.1 <= final["val/accuracy"] <= 0.6, final  # some prompts right, many wrong


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


@pytest.mark.parametrize("method", list(RL))
def test_rl_raises_training_reward(rl_records, method):
    train = [r for r in rl_records(method) if r["kind"] == "train"]
    first, last = train[:5], train[-5:]
    reward_first = sum(r["reward/mean"] for r in first) / len(first)
    reward_last = sum(r["reward/mean"] for r in last) / len(last)
    assert reward_last > reward_first, (method, reward_first, reward_last)
