"""The driver end to end on the real stack (Ray, vLLM CPU, DeepSpeed gloo) with the tiny VL model:
a few steps change the weights and write metrics and checkpoints; resume reproduces an
uninterrupted run; dynamic sampling refills; a parquet in the reference implementation's format
trains with only the data files given. (One-step-off: tests/launch/test_topology.py.)"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from calibrl.config import load_config
from calibrl.data.synthetic import generate_examples, write_splits
from launch.memory import memory_by_actor
from launch.metrics import read_metrics
from launch.train import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e-data")
    write_splits(str(d), n_train=4, n_val=4, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    return str(d)


def overrides(tiny_models, data_dir, out, *extra):
    return [f"model.path={tiny_models['tiny-qwen2.5-vl']}", "model.max_model_len=512",
            f"data.train_files=[{data_dir}/train.parquet]", f"data.val_files=[{data_dir}/val.parquet]",
            "data.max_prompt_length=400", "rollout.samples_per_prompt=4", "rollout.max_response_length=12",
            "rollout.kv_cache_memory_mib=64", "rollout.stream_chunk_prompts=1", "trainer.prompts_per_step=2",
            "learner.mini_batch_prompts=2", "learner.micro_batch_per_device=4", "learner.lr=1e-3",
            "learner.num_cpus_per_learner=0.5", "rollout.num_cpus_per_worker=0.5",
            "trainer.eval_max_prompts=2", "trainer.eval_pass_k=2", "trainer.eval_every_steps=0",
            f"trainer.output_dir={out}", *extra]


def run(cfg):
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        return trainer, ray.get(trainer.rollout[0].info.remote())
    finally:
        trainer.shutdown()


def train_records(out):
    return {r["step"]: r for r in read_metrics(out) if r["kind"] == "train"}


def rollout_records(out):
    with open(os.path.join(out, "rollouts.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_three_steps_end_to_end(ray_local, tiny_models, data_dir, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(None, overrides(tiny_models, data_dir, out, "trainer.total_steps=3",
                                      "trainer.save_every_steps=2", "rollout.temperature=0.8",
                                      "verifier.reward_function=tests.launch.reward_fns:odd_length"))
    trainer, info = run(cfg)
    steps = train_records(out)
    assert sorted(steps) == [1, 2, 3]
    assert any(r["calib/advantage_abs_mean"] > 0 for r in steps.values())  # there was a learning signal
    names = {"rollout-0", "learner-0", "verifier-0", "expert-store", "driver"}
    for r in steps.values():
        for key in ("reward/mean", "acc/pass_rate", "groups/all_fail_frac", "policy/entropy", "loss/pg",
                    "loss/calib", "train/calib_branch_full_frac", "train/pg_clipfrac_upper",
                    "train/approx_kl", "policy/expert_minus_policy_logp", "time/rollout_s", "time/train_s",
                    "time/sync_s", "perf/tokens_per_s", "weights/staleness_max"):
            assert key in r, key
        # the learner recomputes exactly what vLLM sampled from (same weights, inputs and temperature),
        # chunk by chunk while the step generated, each row landing where it belongs
        assert r["policy/rollout_vs_learner_logp_gap"] < 1e-3
        assert r["perf/logprobs_streamed"] == 1.0
        # every process's memory, named as on the Ray dashboard (each actor's last answer: never waited on)
        assert set(memory_by_actor(r)) == names
    # the end of the run waits for every actor's fresh answer: each a real process of plausible size
    memory = memory_by_actor(read_metrics(out)[-1])
    assert set(memory) == names
    for name, m in memory.items():
        assert 0.05 < m["rss_gb"] <= m["peak_rss_gb"] < 24, (name, m)
    # the verifier scores in forked children (counted once, by their proportional share); the driver's
    # descendants are this local Ray cluster, actors included: not counted as the driver's
    assert memory["verifier-0"]["children_pss_gb"] > 0.01 and "children_pss_gb" not in memory["driver"]
    # the engine (vLLM + the VL model) and the learner (DeepSpeed + the model) hold more than the verifier
    assert min(memory["rollout-0"]["peak_rss_gb"], memory["learner-0"]["peak_rss_gb"]) > \
        memory["verifier-0"]["peak_rss_gb"]
    assert info["weights_version"] == trainer.version == 3  # the engine serves the last update
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3] and "val/pass_at_k" in evals[-1]
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_000002", "step_000003"]
    from safetensors.torch import load_file
    start = load_file(os.path.join(tiny_models["tiny-qwen2.5-vl"], "model.safetensors"))
    trained = load_file(os.path.join(out, "checkpoints", "step_000003", "learner", "hf", "model.safetensors"))
    assert set(start) == set(trained)  # the HF export uses checkpoint names
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))


def test_resume_matches_uninterrupted_run_across_an_epoch_boundary(ray_local, tiny_models, data_dir,
                                                                   tmp_path):
    # 4 training prompts, 2 per step: the checkpoint at step 2 sits exactly on an epoch boundary
    full = str(tmp_path / "full")
    run(load_config(None, overrides(tiny_models, data_dir, full, "trainer.total_steps=3",
                                    "trainer.save_every_steps=2")))
    resumed = str(tmp_path / "resumed")
    ckpt = os.path.join(full, "checkpoints", "step_000002")
    run(load_config(None, overrides(tiny_models, data_dir, resumed, "trainer.total_steps=3",
                                    f"trainer.resume={ckpt}")))
    a, b = train_records(full)[3], train_records(resumed)[3]
    assert sorted(train_records(resumed)) == [3]  # it trained the remaining step, no more, no less
    assert rollout_records(full)[3]["prompt_ids"] == rollout_records(resumed)[3]["prompt_ids"]
    assert rollout_records(full)[3]["samples"] == rollout_records(resumed)[3]["samples"]
    for key in ("reward/mean", "loss/total", "loss/calib", "policy/entropy", "calib/rows",
                "train/skipped_updates", "train/update_norm"):
        assert (key in a) == (key in b), key  # no loss metrics when the step had no signal (skipped)
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key

    # resuming a run that already reached total_steps is an error, not a silent zero-step success
    with pytest.raises(RuntimeError, match="nothing left to train"):
        run(load_config(None, overrides(tiny_models, data_dir, str(tmp_path / "again"),
                                        "trainer.total_steps=2", f"trainer.resume={ckpt}")))


def test_dynamic_sampling_refills_the_batch(ray_local, tiny_models, data_dir, tmp_path):
    out = str(tmp_path / "dapo")
    cfg = load_config(None, overrides(
        tiny_models, data_dir, out, "trainer.total_steps=3", "algorithm.name=dapo",
        "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=4", "algorithm.clip_high=0.28",
        "algorithm.std_normalize=true",
        "verifier.reward_function=tests.launch.reward_fns:odd_answers_only"))
    run(cfg)
    steps = train_records(out)
    assert sorted(steps) == [1, 2, 3]
    refilled = [r for r in steps.values() if r["sampling/rounds"] > 1]
    assert refilled, "no step needed a second sampling round"
    for r in refilled:
        assert r["sampling/prompts_drawn"] > 2 and r["calib/groups_dropped"] >= 1
    for r in steps.values():
        if not r.get("sampling/skipped_step"):
            assert 1 <= r["calib/groups"] <= 2  # only informative groups were kept
            assert r["perf/logprobs_streamed"] == 0.0  # the batch is known only at the end
            assert r["groups/all_fail_frac"] > 0 or r["sampling/rounds"] == 1


def reference_format_file(path, n=4):
    """A parquet laid out like the authors' verl fork: chat prompt, {bytes} images, reward_model, solution."""
    rows = []
    for i, ex in enumerate(generate_examples(n, seed=5, split="ref", multimodal=True)):
        rows.append({"data_source": "ref/count", "prompt": [{"role": "user", "content": ex.prompt}],
                     "images": [{"bytes": ex.images[0], "path": None}],
                     "reward_model": {"ground_truth": ex.answer, "style": "rule"},
                     "solution": ex.experts[0], "extra_info": {"index": i, "split": "train"}})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_reference_format_trains_with_only_data_files_on_the_command_line(ray_local, tiny_models, tmp_path):
    from launch.cli import main

    reference_format_file(str(tmp_path / "ref_train.parquet"))
    reference_format_file(str(tmp_path / "ref_val.parquet"), n=2)
    base = tmp_path / "base.yaml"
    cfg_lines = [o.replace("=", ": ", 1) for o in overrides(tiny_models, "unused", str(tmp_path / "run"),
                                                             "trainer.total_steps=2")
                 if not o.startswith("data.train_files") and not o.startswith("data.val_files")]
    import yaml
    nested = {}
    for line in cfg_lines:
        key, value = line.split(": ", 1)
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    base.write_text(yaml.safe_dump(nested))
    main(["train", str(base), f"data.train_files=[{tmp_path}/ref_train.parquet]",
          f"data.val_files=[{tmp_path}/ref_val.parquet]"])
    steps = train_records(str(tmp_path / "run"))
    assert sorted(steps) == [1, 2]
    # the `solution` column became the experts
    assert all(r["calib/expert_rows"] == 2 for r in steps.values())


def test_sft_baseline_trains_on_experts_without_rollouts(ray_local, tiny_models, data_dir, tmp_path):
    out = str(tmp_path / "sft")
    run(load_config(None, overrides(tiny_models, data_dir, out, "trainer.total_steps=3", "algorithm.name=sft",
                                    "trainer.sft_batch_prompts=4", "learner.lr=3e-3")))
    steps = train_records(out)
    assert sorted(steps) == [1, 2, 3]
    assert steps[3]["train/sft_loss"] < steps[1]["train/sft_loss"]  # cross-entropy on the experts falls
    assert not os.path.exists(os.path.join(out, "rollouts.jsonl"))  # nothing was sampled for training
