"""`calibrl submit` against a real Ray head started with `ray start --head` (token authentication on,
Ray 2.60's default): a one-step tiny run is submitted, followed to SUCCEEDED, and its run directory
lands where the submitting machine expects it; the jobs API refuses a request without the token."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from calibrl.data.synthetic import write_splits

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """(dashboard URL, environment with the head's token) of a fresh head; stopped afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # token authentication, as on a Ray 2.60 head whose user has a token (`ray start` then uses it)
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    env["RAY_AUTH_MODE"] = "token"
    dash = free_port()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rsub")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block",
         f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
         # its own agent and metrics ports: another Ray instance on this machine may hold the defaults
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # answering (even 401): up
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up in 120 s")
    yield url, {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # submit finds the token itself
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # Ray's graceful stop takes ~30 s; the head is ours, all of it goes
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def test_submit_follows_a_tiny_run_to_succeeded_on_an_authenticated_head(ray_head, tiny_models, tmp_path):
    url, env = ray_head
    assert os.path.exists(os.path.join(env["HOME"], ".ray", "auth_token"))  # `ray start` made one
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert refused.value.code == 401  # no token, no jobs API

    data = tmp_path / "data"
    write_splits(str(data), n_train=4, n_val=2, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    out = os.path.relpath(tmp_path / "run", ROOT)  # relative: submit makes it absolute for the job
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "configs/cpu_demo.yaml", "--address", url, "--follow",
         "--python", sys.executable, f"model.path={tiny_models['tiny-qwen2.5-vl']}",
         f"data.train_files=[{data}/train.parquet]", f"data.val_files=[{data}/val.parquet]",
         "rollout.samples_per_prompt=2", "rollout.max_response_length=8", "rollout.kv_cache_memory_mib=64",
         "trainer.prompts_per_step=2", "learner.mini_batch_prompts=2", "learner.micro_batch_per_device=4",
         "trainer.sft_warmup_steps=0",
         "trainer.total_steps=1", "trainer.eval_max_prompts=2", "trainer.eval_pass_k=0",
         f"trainer.output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "(token authentication)" in console and "ray job logs" in console
    assert proc.stdout.rstrip().endswith("SUCCEEDED"), console[-2000:]
    assert "[calibrl] eval at step 1 (final)" in console  # the job's own console, streamed back
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
