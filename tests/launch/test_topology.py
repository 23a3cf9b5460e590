"""The 7B recipe's topology at tiny scale: configs/qwen25vl_7b_calibrl.yaml itself, with only the
model, the data and the sizes overridden (plus one-step-off on, and a reward the random tiny model
can earn): 2 ZeRO-3 learners with
gradient checkpointing, 2 rollout engines fed through vLLM's weight-transfer API (gloo here,
NCCL on GPU: the recipe says `auto`), 2 verifiers, 2 steps. Then the driver's guards, by injecting
faults into the live actors: an engine on the wrong weights version stops sampling naming it, and
samples older than `trainer.max_staleness` stop the step."""

import os

import pytest
import ray

from calibrl.config import load_config
from calibrl.data.synthetic import write_splits
from launch.metrics import read_metrics
from launch.train import Trainer

pytestmark = pytest.mark.slow

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "qwen25vl_7b_calibrl.yaml")


def set_version(worker, version: int) -> None:
    ray.get(worker.__ray_call__.remote(lambda self: setattr(self, "weights_version", version)))


def test_7b_recipe_shape_two_steps(ray_local, tiny_models, tmp_path):
    data = tmp_path / "data"
    write_splits(str(data), n_train=8, n_val=4, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    out = str(tmp_path / "run")
    cfg = load_config(RECIPE, [
        # model and data
        f"model.path={tiny_models['tiny-qwen2.5-vl']}", "model.dtype=float32", "model.max_model_len=512",
        f"data.train_files=[{data}/train.parquet]", f"data.val_files=[{data}/val.parquet]",
        "data.max_prompt_length=400",
        # sizes
        "rollout.tensor_parallel_size=1", "rollout.samples_per_prompt=3", "rollout.max_response_length=12",
        "rollout.kv_cache_memory_mib=64", "rollout.stream_chunk_prompts=1", "rollout.num_cpus_per_worker=0.5",
        "verifier.num_workers=2", "verifier.num_cpus_per_worker=0.5",
        "learner.num_learners=2", "learner.num_cpus_per_learner=0.5", "learner.mini_batch_prompts=2",
        "learner.micro_batch_per_device=1", "learner.lr=1e-3",
        "trainer.prompts_per_step=4", "trainer.total_steps=2", "trainer.eval_max_prompts=2",
        "trainer.eval_pass_k=1", f"trainer.output_dir={out}",
        "trainer.one_step_off=true",
        # a reward the random tiny model earns on some samples, so that the updates have a signal
        "verifier.reward_function=tests.launch.reward_fns:odd_length",
    ])
    recipe = (cfg.learner.zero_stage, cfg.rollout.weight_sync, cfg.model.gradient_checkpointing)
    assert recipe == (3, "auto", True)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        steps = {r["step"]: r for r in read_metrics(out) if r["kind"] == "train"}
        assert sorted(steps) == [1, 2]
        assert steps[1]["weights/staleness_max"] == 0  # the first batch is sampled before any update
        assert steps[2]["weights/staleness_max"] == 1  # step 2 was sampled while step 1 trained
        # and the driver took step 2's finished chunks in while it waited on step 1's learners
        assert steps[1]["perf/rollout_chunks_taken_early"] == 0
        assert steps[2]["perf/rollout_chunks_taken_early"] >= 1
        assert steps[2]["perf/logprobs_streamed"] == 1  # their old log-probs, in one call, found every row
        assert steps[2]["train/update_norm"] > 0
        # every engine serves the final weights; both verifiers scored
        assert [ray.get(w.info.remote())["weights_version"] for w in trainer.rollout] == [2, 2]
        assert all(s["scored"] > 0 for s in trainer.verifiers.state())

        # an engine on the wrong weights: the next step refuses to sample, naming it
        set_version(trainer.rollout[1], 1)
        with pytest.raises(RuntimeError, match="rollout-1 serves version 1, expected version 2"):
            trainer.start_rollout(3)

        # samples from weights 2 versions behind the learner's: the step stops (max_staleness 1)
        for w in trainer.rollout:
            set_version(w, trainer.version - 2)
        trainer.step = 3
        batch, _ = trainer.stream.finish(trainer.stream.start(3))
        with pytest.raises(RuntimeError, match="2 behind the learner's 2; trainer.max_staleness=1"):
            trainer.check_staleness(batch)
    finally:
        trainer.shutdown()
