"""The console is the user's: third-party output goes to the run directory's logs/, warnings and
errors of any actor still reach the console under the actor's name, and a run prints a short,
readable account of itself (real processes: a Ray actor, then `calibrl train` end to end)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from calibrl.data.synthetic import write_splits
from launch.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHATTY_ACTOR = textwrap.dedent("""
    import logging, sys, time
    import ray
    from actors.group import named_actor

    class Chatty:
        def __init__(self):
            print("third-party chatter on stdout")
            logging.getLogger("vllm.engine").info("engine info line")

        def speak(self):
            logging.getLogger("somelib").warning("disk almost full")
            logging.getLogger("vllm.loader").warning("RotaryEmbedding: Failed to load weights")
            print("more chatter", file=sys.stderr)
            return 1

    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
    actor = named_actor(Chatty, "chatty-0", num_cpus=0, log_dir=sys.argv[1])
    ray.get(actor.speak.remote())
    time.sleep(3)  # Ray's log monitor forwards the actor's console lines to this driver
    ray.shutdown()
""")


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ADDRESS="")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
                          **kw)


def test_an_actors_output_goes_to_its_log_file_and_its_warnings_to_the_console(tmp_path):
    logs = tmp_path / "logs"
    proc = run([sys.executable, "-c", CHATTY_ACTOR, str(logs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    log = (logs / "chatty-0.log").read_text()
    for text in ("third-party chatter on stdout", "engine info line", "more chatter", "disk almost full",
                 "Failed to load weights"):
        assert text in log, text  # everything is kept in the file
    assert "chatter" not in console and "engine info line" not in console
    # the warning reaches the console once, under the actor's name; the known false alarm does not
    warned = [line for line in console.splitlines() if "disk almost full" in line]
    assert len(warned) == 1 and "chatty-0" in warned[0], console
    assert "Failed to load weights" not in console


@pytest.mark.slow
def test_a_training_run_prints_a_short_account_of_itself(tiny_models, tmp_path):
    data = tmp_path / "data"
    write_splits(str(data), n_train=8, n_val=4, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "launch.cli", "train", "configs/cpu_demo.yaml",
                f"model.path={tiny_models['tiny-qwen2.5-vl']}", f"data.train_files=[{data}/train.parquet]",
                f"data.val_files=[{data}/val.parquet]", "rollout.samples_per_prompt=2",
                "rollout.max_response_length=8", "rollout.kv_cache_memory_mib=64",
                "trainer.prompts_per_step=2", "learner.mini_batch_prompts=2",
                "learner.micro_batch_per_device=4", "trainer.sft_warmup_steps=2",
                "trainer.sft_batch_prompts=2", "trainer.total_steps=2", "trainer.eval_every_steps=0",
                "trainer.eval_max_prompts=4", "trainer.save_every_steps=0", f"trainer.output_dir={out}",
                "verifier.reward_function=tests.launch.reward_fns:odd_length"])  # a signal: losses get logged
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 15, "\n".join(lines)
    assert any(line.startswith("[calibrl] eval at step 2 (final)") for line in lines), lines
    assert lines[-1].startswith("[calibrl] done: 2 calibrl steps; held-out greedy accuracy"), lines
    assert not any("INFO" in line or "DeepSpeed" in line for line in lines), lines
    # the progress bars ran to completion (refreshed in place: carriage returns within one line)
    assert any("SFT warm-up" in line and "2/2" in line for line in lines), lines
    assert any("calibrl steps" in line and "2/2" in line for line in lines), lines
    # every metric the Grafana dashboard plots is one this run exported (launch/metrics.py names)
    exported = {"ray_calibrl_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                for record in read_metrics(str(out)) for key in record}
    with open(os.path.join(ROOT, "docker", "grafana", "calibrl.json")) as f:
        plotted = set(re.findall(r"ray_calibrl_\w+", f.read()))
    assert plotted and plotted <= exported, plotted - exported
    logs = sorted(os.listdir(out / "logs"))
    assert logs == ["expert-store.log", "learner-0.log", "rollout-0.log", "verifier-0.log"], logs
    assert "Initializing a V1 LLM engine" in (out / "logs" / "rollout-0.log").read_text()
