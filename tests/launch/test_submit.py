"""`calibrl submit` against a real Ray head started with `ray start --head` (token authentication on,
Ray 2.60's default): a one-step tiny run is submitted, followed to SUCCEEDED, and its run directory
lands where the submitting machine expects it; the jobs API refuses a request without the token."""

import glob
import os
import shutil
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


def _start_head(ray_bin: str, env: dict, log_path) -> tuple[subprocess.Popen, str, str]:
    """(process, dashboard URL, temp dir) of `ray start --head --block` on fresh ports, its output
    in log_path."""
    dash = free_port()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rsub")  # short: Ray's socket paths live under it
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block",
             f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
             "--num-cpus=4",
             # its own ports throughout: another Ray instance on this machine may hold the defaults
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dash}", temp_dir


def _wait_up(head: subprocess.Popen, url: str, timeout: float) -> bool:
    """True once the dashboard answers (even 401); False if the head exits or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline and head.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # answering (even 401): up
        except OSError:
            time.sleep(1)
    return False


def _stop_head(head: subprocess.Popen) -> None:
    """Stops the head's whole process group, whatever `ray start` left running if it exited."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=5)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:  # Ray's graceful stop takes ~30 s; the head is ours, all of it goes
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    head.wait(timeout=30)


def _head_logs(log_path, temp_dir: str) -> str:
    """The tail of `ray start`'s output and of the session's dashboard and GCS logs."""
    paths = [str(log_path)] + sorted(glob.glob(os.path.join(temp_dir, "session_*", "logs", "dashboard.log"))
                                     + glob.glob(os.path.join(temp_dir, "session_*", "logs", "gcs_server.*")))
    parts = []
    for path in paths:
        with open(path, errors="replace") as f:
            parts.append(f"--- {path}\n" + "".join(f.readlines()[-30:]))
    return "\n".join(parts)


@pytest.fixture
def ray_head(tmp_path):
    """(dashboard URL, environment with the head's token) of a fresh head; stopped afterwards.

    A head that exits or does not answer in time (ports taken between choosing and binding them, a
    loaded machine) is stopped and started once more on other ports; the failure shows its logs."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # token authentication, as on a Ray 2.60 head whose user has a token (`ray start` then uses it)
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    env["RAY_AUTH_MODE"] = "token"
    logs = []
    for attempt in range(2):
        log_path = tmp_path / f"ray-start-{attempt}.log"
        head, url, temp_dir = _start_head(ray_bin, env, log_path)
        if _wait_up(head, url, timeout=150):
            break
        exit_code = head.poll()
        _stop_head(head)
        logs.append(f"attempt {attempt}: " + ("no answer in 150 s" if exit_code is None
                                              else f"`ray start` exited with {exit_code}")
                    + "\n" + _head_logs(log_path, temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
    else:
        pytest.fail("the Ray head did not come up, twice:\n" + "\n".join(logs))
    try:
        yield url, {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # submit finds the token itself
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)  # outside tmp_path: socket paths must stay short


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
