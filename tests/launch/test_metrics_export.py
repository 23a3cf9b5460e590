"""Training metrics reach Prometheus through Ray's metrics export: a real Ray instance with a known
export port, one `MetricsLogger.log` call, then the scrape endpoint serves the values under the
run's tag (what docker/prometheus.yml scrapes and docker/grafana/calibrl.json plots)."""

import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import sys, time, urllib.request
    import ray
    from launch.metrics import MetricsLogger

    port, out = int(sys.argv[1]), sys.argv[2]
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port)
    logger = MetricsLogger(out, run_name="probe-run")
    logger.log(2, {"reward/mean": 0.625, "val/accuracy": 0.25, "time/step_s": 1.5})
    deadline = time.time() + 90
    text = ""
    while time.time() < deadline and "calibrl_reward_mean" not in text:
        time.sleep(2)
        logger.log(2, {"reward/mean": 0.625, "val/accuracy": 0.25, "time/step_s": 1.5})
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            pass
    print("\\n".join(line for line in text.splitlines() if "calibrl_" in line and not line.startswith("#")))
    ray.shutdown()
""")


def test_metrics_are_served_to_prometheus_through_rays_export(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ADDRESS="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(port), str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    values = {line.split("{")[0]: (line.split("{")[1].split("}")[0], float(line.rsplit(" ", 1)[1]))
              for line in lines}
    assert values["ray_calibrl_reward_mean"][1] == 0.625, lines
    assert values["ray_calibrl_val_accuracy"][1] == 0.25, lines
    assert values["ray_calibrl_time_step_s"][1] == 1.5, lines
    assert 'run="probe-run"' in values["ray_calibrl_reward_mean"][0], lines
