"""The learner's DeepSpeed set-up on CPU: the shared-memory all-reduce op (inference only) is not
built, so a new environment's first learner does not spend ~45 s compiling C++ (which would also
need a compiler). In a subprocess: the skip edits DeepSpeed's module state."""

import subprocess
import sys

CHECK = """
import os
os.environ["DS_ACCELERATOR"] = "cpu"
from deepspeed.comm.torch import build_shm_op
from actors.learner import skip_shm_all_reduce
skip_shm_all_reduce()
print("OP", build_shm_op())
"""


def test_the_shm_all_reduce_op_is_not_built_on_cpu():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300,
                         check=True)
    assert "OP None" in out.stdout, out.stdout + out.stderr
