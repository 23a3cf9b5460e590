"""Checkpoints are atomic: a driver killed while writing one (SIGKILL mid-write leaves `step_N.tmp`,
or a directory without its `state.json`, written last) leaves the previous one as the one to resume."""

import json
import os

from launch import checkpoint as ckpt


def write(root, step: int, *, complete: bool, tmp: bool = False) -> str:
    path = os.path.join(ckpt.checkpoint_root(root), f"step_{step:06d}" + (".tmp" if tmp else ""))
    os.makedirs(os.path.join(path, "learner"))
    if complete:
        with open(os.path.join(path, "state.json"), "w") as f:
            json.dump({"step": step}, f)
    return path


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    root = str(tmp_path)
    good = write(root, 2, complete=True)
    write(root, 4, complete=False, tmp=True)   # killed while DeepSpeed wrote its files
    write(root, 6, complete=True, tmp=True)    # killed between state.json and the rename
    assert ckpt.list_checkpoints(root) == [(2, good)]
    assert ckpt.resolve_resume("auto", root) == good
    # the next save of step 4 starts from a clean temporary directory
    tmp = ckpt.begin(root, 4)
    assert os.listdir(tmp) == []
    final = ckpt.commit(tmp, state={"step": 4}, config_yaml="", experts_dir=None, keep=5)
    assert ckpt.resolve_resume("auto", root) == final
