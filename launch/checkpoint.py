"""Checkpoints: written atomically, found for `trainer.resume`, pruned to `trainer.keep_checkpoints`.

A checkpoint is a directory `OUTPUT_DIR/checkpoints/step_{N:06d}` holding
- `learner/`: DeepSpeed's own state (weights, optimizer, scheduler) and `learner/hf/`, an HF
  `save_pretrained` export that transformers and vLLM load;
- `state.json`: the step, the weights version, the dataloader positions and the driver's RNG states;
- `config.yaml`: the resolved configuration;
- `experts/`: the expert store's additions at that step.
It is written under `step_{N}.tmp` and renamed when complete, so a crash mid-write leaves the
previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first: [(step, path)]."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := STEP_DIR.match(name)) and os.path.exists(os.path.join(root, name, "state.json"))]
    return sorted(found)


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint to resume from: `never` -> None, `auto` -> the latest (or None), else the path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.exists(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"trainer.resume={resume!r} is not a complete checkpoint (no state.json)")
    return resume


def rng_state() -> dict:
    """The driver's RNG states as JSON-able values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def begin(output_dir: str, step: int) -> str:
    """A fresh temporary directory for step `step`'s checkpoint."""
    tmp = os.path.join(checkpoint_root(output_dir), f"step_{step:06d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, *, state: dict, config_yaml: str, experts_dir: str | None, keep: int) -> str:
    """Write the driver's files into `tmp`, rename it to its final name, prune old checkpoints."""
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(config_yaml)
    if experts_dir and os.path.isdir(experts_dir):
        shutil.copytree(experts_dir, os.path.join(tmp, "experts"))
    with open(os.path.join(tmp, "state.json"), "w") as f:  # last: its presence marks a complete checkpoint
        json.dump(state, f)
    final = tmp.removesuffix(".tmp")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, path in list_checkpoints(os.path.dirname(os.path.dirname(final)))[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "state.json")) as f:
        return json.load(f)


def restore_expert_additions(ckpt: str, experts_dir: str) -> None:
    """Put the expert store's additions back as they were at the checkpoint (before the store starts)."""
    src = os.path.join(ckpt, "experts")
    shutil.rmtree(experts_dir, ignore_errors=True)
    if os.path.isdir(src):
        shutil.copytree(src, experts_dir)
