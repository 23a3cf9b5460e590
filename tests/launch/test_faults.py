"""Lost actors, injected by signals to the real processes, in one run of the real stack (2 engines,
2 verifiers, 2 ZeRO learners, the expert store): an engine SIGKILLed mid-step has its prompts sent
to the other engine and comes back with the current weights, also when it dies while one-step-off
mode generates the next step during an update (the driver takes the other engine's chunks in
meanwhile); a verifier SIGSTOPped mid-step is cut
off by its deadline and its chunk scored elsewhere; a SIGKILLed expert store comes back; each step
completes with every group. A SIGKILLed learner rank stops the run with a message naming it. And
SIGTERM to the driver stops `calibrl train` at a step boundary with a checkpoint, exit status 0."""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from omegaconf import OmegaConf

from calibrl.config import load_config
from calibrl.data.synthetic import write_splits
from launch import checkpoint as ckpt
from launch.errors import RunStopped
from launch.metrics import read_metrics
from launch.train import Trainer

pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def settings(tiny_models, data, out, *extra):
    return [f"model.path={tiny_models['tiny-qwen2.5-vl']}", "model.max_model_len=512",
            f"data.train_files=[{data}/train.parquet]", f"data.val_files=[{data}/val.parquet]",
            "data.max_prompt_length=400", "rollout.samples_per_prompt=4",
            "rollout.max_response_length=12", "rollout.kv_cache_memory_mib=64",
            "rollout.stream_chunk_prompts=1",
            "rollout.num_cpus_per_worker=0.5", "verifier.num_cpus_per_worker=0.5",
            "learner.num_cpus_per_learner=0.5", "trainer.prompts_per_step=4",
            "learner.mini_batch_prompts=2",
            "learner.micro_batch_per_device=2", "learner.lr=1e-3", "trainer.eval_max_prompts=2",
            "trainer.eval_pass_k=1", "trainer.eval_every_steps=0",
            "verifier.reward_function=tests.launch.reward_fns:odd_length", f"trainer.output_dir={out}",
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault-data")
    write_splits(str(d), n_train=16, n_val=4, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    return str(d)


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def step(trainer, n):
    trainer.step = n
    trainer.train_step(trainer.start_rollout(n))
    return {r["step"]: r for r in read_metrics(trainer.out) if r["kind"] == "train"}[n]


def test_lost_actors_mid_step(ray_local, tiny_models, data, tmp_path):
    cfg = load_config(None, settings(tiny_models, data, str(tmp_path / "run"),
                                     "rollout.num_workers=2", "verifier.num_workers=2",
                                     "learner.num_learners=2",
                                     "reliability.verify_timeout_s=5", "reliability.logprobs_timeout_s=120",
                                     "reliability.train_timeout_s=120"))
    trainer = Trainer(cfg)
    try:
        assert step(trainer, 1)["calib/groups"] == 4

        # an engine dies while it generates: its prompts go to the other one; it comes back with the weights
        pid = ray.get(trainer.rollout[0].info.remote())["pid"]  # asked first: the engine answers in turn
        pending = trainer.start_rollout(2)
        os.kill(pid, signal.SIGKILL)
        trainer.step = 2
        trainer.train_step(pending)
        m = {r["step"]: r for r in read_metrics(trainer.out) if r["kind"] == "train"}[2]
        assert m["calib/groups"] == 4 and m["faults/engine_chunks_resent"] >= 1
        assert m["faults/engine_recoveries"] == 1
        assert [ray.get(w.info.remote())["weights_version"] for w in trainer.rollout] == [trainer.version] * 2

        # a verifier hangs: its deadline (5 s) cuts it off, the chunk is scored on the other one
        os.kill(pid_of(trainer.verifiers.workers[0]), signal.SIGSTOP)
        t0 = time.time()
        m = step(trainer, 3)
        assert m["calib/groups"] == 4 and m["faults/verifier_chunks_resent"] >= 1
        assert time.time() - t0 < 90

        # the expert store dies: Ray restarts it (its data and additions reload) and retries the reads
        os.kill(pid_of(trainer.experts), signal.SIGKILL)
        m = step(trainer, 4)
        assert m["calib/groups"] == 4 and m["calib/expert_rows"] == 4

        # one-step-off: step 6 generates during step 5's update, and the driver takes its finished
        # chunks in meanwhile; an engine killed right after step 6 is submitted is left to step 6's
        # finish, which sends its prompts to the other engine and brings it back with the weights
        trainer.cfg.trainer.one_step_off = True
        pid = ray.get(trainer.rollout[0].info.remote())["pid"]
        start = trainer.start_rollout

        def start_then_kill(n):
            pending = start(n)
            os.kill(pid, signal.SIGKILL)
            lost = [ref for ref, job in pending.refs.items() if job.worker == 0]
            ray.wait(lost, num_returns=len(lost), timeout=60)  # Ray has seen the death before the update
            return pending

        trainer.step = 5
        pending5 = start(5)
        trainer.start_rollout = start_then_kill
        pending6 = trainer.train_step(pending5)
        trainer.start_rollout = start
        assert pending6.step == 6 and pending6.taken_early >= 1  # engine 1's chunks, during step 5
        assert pending6.failed  # engine 0's, left to finish
        trainer.cfg.trainer.one_step_off = False
        trainer.step = 6
        assert trainer.train_step(pending6) is None
        m = {r["step"]: r for r in read_metrics(trainer.out) if r["kind"] == "train"}[6]
        assert m["calib/groups"] == 4 and m["faults/engine_chunks_resent"] >= 1
        assert m["perf/rollout_chunks_taken_early"] >= 1 and m["weights/staleness_max"] == 1
        assert m["perf/logprobs_streamed"] == 1  # the early chunks scored in one call, the resent one alone
        assert [ray.get(w.info.remote())["weights_version"] for w in trainer.rollout] == [trainer.version] * 2

        # a learner rank dies: the run stops within the deadline, naming it
        os.kill(pid_of(trainer.learners.actors[1]), signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(RunStopped, match=r"learner-1 died during .*trainer.resume=auto"):
            step(trainer, 7)
        assert time.time() - t0 < 120
    finally:
        trainer.shutdown()


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tiny_models, data, tmp_path):
    out = str(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(settings(tiny_models, data, out,
                                                                        "trainer.total_steps=50"))))
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"CALIBRL_DASHBOARD": "0"})
    try:
        deadline = time.time() + 300
        metrics = os.path.join(out, "metrics.jsonl")
        while time.time() < deadline and not (os.path.exists(metrics)
                                              and any(r["kind"] == "train" for r in read_metrics(out))):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        console, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, console
    assert "SIGTERM: stopping after this step" in console and "Traceback" not in console
    (last, path), = ckpt.list_checkpoints(out)[-1:]
    assert 1 <= last < 50 and ckpt.load_state(path)["step"] == last
    assert max(r["step"] for r in read_metrics(out) if r["kind"] == "train") == last
