"""scripts/gpu_check.py, the check a GPU machine without Ray or vLLM runs, on the CPU (`--device cpu`)
with ray, vllm and math_verify unimportable, as they are there: every loss matches float64, the
compiled losses do not recompile, and one DeepSpeed learner rank at ZeRO-2, ZeRO-3 and on the VL
model lowers its losses and exports its weights."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

SITE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "vllm", "math_verify"}:
            raise ModuleNotFoundError(f"{name} is not on the GPU machine", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_gpu_check_runs_without_ray_or_vllm(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), ROOT])}
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--skip", "time",
                          "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["results"]
    checks = {r["check"]: r for r in results}
    assert all(r["ok"] for r in results)
    for name in ("calibrl", "grpo", "dapo", "sft", "luffy", "rlplus"):
        assert checks[f"loss {name}"]["compiled_vs_float64"] < 1e-5
        padded = checks[f"loss {name}, length padded to a multiple of 16"]
        assert padded["compiled_vs_float64"] < 1e-5 and padded["length"] == 16
    for learner in ("tiny-qwen2 ZeRO-2", "tiny-qwen2 ZeRO-3", "tiny-qwen2.5-vl ZeRO-2"):
        calib = checks[f"learner {learner}: CalibRL loss falls"]
        assert calib["last"] < calib["first"]
        assert checks[f"learner {learner}: start"]["backend"] == "gloo"
        assert checks[f"learner {learner}: start"]["pad_multiple"] == 1  # eager on a CPU: no padding
        assert checks[f"learner {learner}: memory as a run logs it"]["peak_rss_GB"] > 0.1
    zero3 = checks["learner tiny-qwen2 ZeRO-3: export equals the gathered weights"]
    assert zero3["path"] == "partitions, no gather"
    # the blocker really blocks
    ray = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True,
                         check=False)
    assert ray.returncode != 0 and "ray is not on the GPU machine" in ray.stderr

