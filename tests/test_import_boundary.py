"""calibrl/ is pure: importing every module must work with ray, vllm and deepspeed unavailable."""

import subprocess
import sys

BLOCKER = r"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "vllm", "deepspeed"}:
            raise ImportError(f"calibrl must not import {name}")
sys.meta_path.insert(0, Block())
import calibrl
names = [m.name for m in pkgutil.walk_packages(calibrl.__path__, "calibrl.")]
for n in names:
    importlib.import_module(n)
print(len(names))
"""


def test_calibrl_imports_without_ray_vllm_deepspeed():
    out = subprocess.run([sys.executable, "-c", BLOCKER], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3


def test_blocker_really_blocks():
    code = BLOCKER.replace("import calibrl\n", "import ray\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode != 0 and "must not import ray" in out.stderr
