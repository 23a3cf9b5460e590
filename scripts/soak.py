"""Soak run (not part of CI): 50 steps of a tiny CalibRL run while rollout engines, verifiers and the
driver itself are killed at random steps; the driver is then started again with `trainer.resume=auto`.

    .venv/bin/python scripts/soak.py [--steps 50] [--faults 8] [--seed 0] [--out runs/soak]

Ends when a run reaches the last step, then checks that every checkpoint left loads (its state, its
HF export through transformers) and prints the faults injected and survived. Exit status 0 when the
run reached the last step and every checkpoint loads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

ROLES = {"rollout": "ray::RolloutWorker", "verifier": "ray::VerifierWorker"}


def pids(pattern: str, session: int) -> list[int]:
    """Processes of the run's session (its own process group tree) whose command line has `pattern`."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        pid, sid, args = line.strip().split(None, 2)
        if int(sid) == session and pattern in args:
            found.append(int(pid))
    return found


def last_step(out: str) -> int:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [r["step"] for r in map(json.loads, filter(str.strip, f)) if r.get("kind") == "train"]
    return max(steps, default=0)


def start(config: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", config], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"CALIBRL_DASHBOARD": "0"})


def stop_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--faults", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from calibrl.data.synthetic import write_splits
    from calibrl.tiny_models import make_all

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model = make_all(os.path.join(out, "models"))["tiny-qwen2"]
    data = write_splits(os.path.join(out, "data"), n_train=64, n_val=8, n_test=4, seed=0, multimodal=False,
                        difficulty=1)
    run = os.path.join(out, "run")
    config = os.path.join(out, "soak.yaml")
    OmegaConf.save(OmegaConf.from_dotlist([
        f"model.path={model}", "model.max_model_len=512", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['val']}]", "data.max_prompt_length=400", "rollout.num_workers=2",
        "rollout.samples_per_prompt=4", "rollout.max_response_length=24", "rollout.kv_cache_memory_mib=64",
        "rollout.stream_chunk_prompts=2", "rollout.num_cpus_per_worker=0.5", "verifier.num_workers=2",
        "verifier.num_cpus_per_worker=0.5", "learner.num_cpus_per_learner=0.5", "learner.lr=1e-4",
        "learner.mini_batch_prompts=4", "trainer.prompts_per_step=8", f"trainer.total_steps={args.steps}",
        "trainer.save_every_steps=5", "trainer.keep_checkpoints=20", "trainer.eval_every_steps=0",
        "trainer.eval_max_prompts=8", "trainer.eval_pass_k=1", f"trainer.output_dir={run}",
        "trainer.resume=auto", "reliability.verify_timeout_s=20",
        "reliability.rollout_timeout_s=120"]), config)

    rng = random.Random(args.seed)
    plan = sorted(rng.sample(range(2, args.steps - 1), args.faults))
    kinds = [rng.choice(["rollout", "verifier", "driver"]) for _ in plan]
    print(f"soak: {args.steps} steps; faults at steps {list(zip(plan, kinds))}", flush=True)
    injected = {k: 0 for k in ("rollout", "verifier", "driver")}
    log = open(os.path.join(out, "soak.log"), "w")  # noqa: SIM115 - the drivers' console, open throughout
    proc = start(config, log)
    pending = list(zip(plan, kinds))
    unplanned = 0  # driver exits nobody injected (a fault the run did not survive by itself)
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            if last_step(run) >= args.steps:
                break
            if proc.returncode == 2:
                print(f"soak: the driver refused its input (exit 2); see {out}/soak.log", flush=True)
                return 2
            print(f"soak: the driver exited ({proc.returncode}) at step {last_step(run)}; starting it again",
                  flush=True)
            unplanned += 1
            proc = start(config, log)
        step = last_step(run)
        if pending and step >= pending[0][0]:
            _, kind = pending.pop(0)
            if kind == "driver":
                stop_session(proc)
                print(f"soak: step {step}: killed the driver (SIGKILL); resuming", flush=True)
                proc = start(config, log)
            else:
                victims = pids(ROLES[kind], os.getsid(proc.pid))
                if victims:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    print(f"soak: step {step}: killed a {kind} process (SIGKILL)", flush=True)
                else:
                    print(f"soak: step {step}: no {kind} process found; fault skipped", flush=True)
                    continue
            injected[kind] += 1
        time.sleep(0.5)
    elapsed = time.time() - t0
    stop_session(proc)

    from transformers import AutoModelForCausalLM

    from launch import checkpoint as ckpt

    loadable, bad = 0, []
    for step, path in ckpt.list_checkpoints(run):
        try:
            assert ckpt.load_state(path)["step"] == step
            AutoModelForCausalLM.from_pretrained(os.path.join(path, "learner", "hf"))
            assert os.path.isdir(os.path.join(path, "learner", "deepspeed"))
            loadable += 1
        except Exception as e:  # noqa: BLE001 - reported, not raised
            bad.append(f"{path}: {e}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    recoveries = max((r.get("faults/engine_recoveries", 0) for r in records), default=0)
    resent = sum(r.get("faults/engine_chunks_resent", 0) + r.get("faults/verifier_chunks_resent", 0)
                 for r in records)
    steps = sorted(r["step"] for r in records if r.get("kind") == "train")
    print("\n| fault | injected |\n|---|---|")
    for kind, n in injected.items():
        print(f"| {kind} killed | {n} |")
    print(f"| driver exits not injected (each resumed) | {unplanned} |")
    gaps = "without gaps or repeats" if steps == list(range(1, steps[-1] + 1)) else "WITH GAPS OR REPEATS"
    loads = f"all {loadable} checkpoints load" if not bad else f"unloadable checkpoints: {bad}"
    print(f"\nsoak: reached step {last_step(run)}/{args.steps} in {elapsed:.0f} s; train records of steps "
          f"1..{steps[-1]} {gaps}; chunks resent {resent:.0f}, engine recoveries {recoveries:.0f} (in the "
          f"last driver's run); {loads}")
    ok = last_step(run) >= args.steps and not bad and steps == list(range(1, steps[-1] + 1)) and not unplanned
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
