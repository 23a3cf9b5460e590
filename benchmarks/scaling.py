"""Benchmark: how a step's cost grows, and what one-step-off buys, on the CPU demo's model and task.

    .venv/bin/python benchmarks/scaling.py            # samples 2..16 at 16 prompts; prompts 8..128 at n=4
    .venv/bin/python benchmarks/scaling.py --quick    # fewer points
    .venv/bin/python benchmarks/scaling.py --demo-only  # only the demo's three modes (no curves, no PNG)

For each setting: GRPO from the tiny text model, 1 warm-up step and `--steps` timed steps (medians of
the driver's `time/*` metrics), all in one Ray session. Then the demo itself (configs/cpu_demo.yaml:
the tiny VL model, CalibRL, 64 prompts x 4, 4 updates per step; RL steps only, no SFT warm-up) three
ways, side by side: synchronous with the old log-probs after generation, synchronous with them
streamed during generation (the default), and one-step-off: its step time against max(rollout, log-probs
+ train) of the synchronous run (target <= 1.15x), and where the CPU went in each: CPU seconds per
step of the learner, rollout, verifier and driver processes (/proc, between the end of the warm-up
step and the end of the last, by psutil), the whole machine's busy seconds, the hypervisor's steal among them,
and how many cores were kept busy; and the peak resident memory of each actor's process (and the
driver's) as the run logged it (launch/memory.py). Every run scores responses with
benchmarks/rewards.py:odd_length, which a random model earns half the time, so every step trains.
Prints the tables and the fitted slopes (seconds per completion, least squares), and writes
`scaling.png` (the curves) to --out.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLES = (("learner", "ray::Learner"), ("rollout", "ray::RolloutWorker"), ("verifier", "ray::VerifierWorker"))
KEYS = ("time/step_s", "time/rollout_s", "time/logprobs_s", "time/train_s", "time/sync_s")
REWARD = "verifier.reward_function=benchmarks.rewards:odd_length"


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes (ROLES, matched by their Ray
    process titles, and this process as the driver); `busy`: by the whole machine (all but idle and
    iowait), `steal` of which the hypervisor gave to other guests."""
    import psutil

    out = dict.fromkeys([role for role, _ in ROLES] + ["driver"], 0.0)
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        title, used = (proc.info["cmdline"] or [""])[0], proc.info["cpu_times"]
        role = next((r for r, prefix in ROLES if title.startswith(prefix)), None)
        role = "driver" if proc.pid == os.getpid() else role
        if role and used:
            out[role] += used.user + used.system
    machine = psutil.cpu_times()
    out["busy"] = sum(machine) - machine.idle - machine.iowait - machine.guest - machine.guest_nice
    out["steal"] = machine.steal
    return out


def timed_run(config: str | None, overrides: list[str]) -> dict:
    """Medians of the `time/*` metrics over every step but the first (the warm-up), and `cpu`: each
    role's CPU seconds per step over the same steps, with `cores`, the machine's busy cores."""
    from calibrl.config import load_config
    from launch.memory import last_memory
    from launch.metrics import read_metrics
    from launch.train import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    marks = []  # (wall time, cpu_seconds()) at the end of each RL step
    step = trainer.train_step

    def marked(pending):
        out = step(pending)
        marks.append((time.time(), cpu_seconds()))
        return out

    trainer.train_step = marked
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    records = read_metrics(cfg.trainer.output_dir)
    rows = [r for r in records if r["kind"] == "train"][1:]
    result = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in KEYS}
    result["memory"] = last_memory(records)  # each process's, as the run logged it at its end
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    steps = max(1, len(marks) - 1)
    result["cpu"] = {k: (c1[k] - c0[k]) / steps for k in c1}
    result["cpu"]["cores"] = (c1["busy"] - c0["busy"]) / (t1 - t0)
    return result


def run(model: str, data: dict, out: str, *, prompts: int, samples: int, steps: int) -> dict:
    return timed_run(None, [
        f"model.path={model}", "model.max_model_len=512", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['val']}]", "data.max_prompt_length=400", "algorithm.name=grpo",
        "algorithm.std_normalize=true", "algorithm.mixup=never", f"rollout.samples_per_prompt={samples}",
        "rollout.max_response_length=48", "rollout.kv_cache_memory_mib=256",
        "rollout.stream_chunk_prompts=4",
        f"trainer.prompts_per_step={prompts}", f"learner.mini_batch_prompts={prompts}",
        f"learner.micro_batch_per_device={8 if prompts * samples % 8 == 0 else 2}",
        f"trainer.total_steps={steps + 1}", "trainer.eval_max_prompts=1", "trainer.eval_pass_k=0",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", f"trainer.output_dir={out}",
        "trainer.resume=never", REWARD])


def run_demo(root: str, out: str, *, steps: int, extra=()) -> dict:
    """configs/cpu_demo.yaml's RL steps on its model and data (made under `root`)."""
    return timed_run(str(ROOT / "configs" / "cpu_demo.yaml"), [
        f"model.path={root}/tiny-models/tiny-qwen2.5-vl", f"data.train_files=[{root}/data/train.parquet]",
        f"data.val_files=[{root}/data/val.parquet]", "trainer.sft_warmup_steps=0",
        f"trainer.total_steps={steps + 1}", "trainer.eval_max_prompts=1", "trainer.eval_pass_k=0",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", f"trainer.output_dir={out}", REWARD,
        *extra])


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--demo-only", action="store_true", help="only the demo's step, three ways")
    ap.add_argument("--out", default="runs/bench-scaling")
    args = ap.parse_args()

    from calibrl.data.synthetic import write_splits
    from calibrl.tiny_models import make_tiny_qwen2

    tmp = tempfile.mkdtemp(prefix="calibrl-scaling-")
    os.makedirs(args.out, exist_ok=True)
    by_samples, by_prompts = {}, {}
    if not args.demo_only:
        model = make_tiny_qwen2(os.path.join(tmp, "tiny-qwen2"))
        data = write_splits(os.path.join(tmp, "data"), n_train=1024, n_val=8, n_test=8, seed=0,
                            multimodal=False, difficulty=1)
        samples = [2, 4, 8, 16] if args.quick else [2, 4, 6, 8, 12, 16]
        prompts = [8, 32, 128] if args.quick else [8, 16, 32, 64, 128]
        by_samples = {n: run(model, data, os.path.join(tmp, f"n{n}"), prompts=16, samples=n, steps=args.steps)
                      for n in samples}
        by_prompts = {p: run(model, data, os.path.join(tmp, f"p{p}"), prompts=p, samples=4, steps=args.steps)
                      for p in prompts}
    from launch.cli import make_demo_data

    demo = os.path.join(tmp, "demo")
    make_demo_data(demo, n_train=512, n_val=8, n_test=8)
    after = run_demo(demo, os.path.join(tmp, "after"), steps=args.steps,
                     extra=["trainer.stream_logprobs=false"])
    sync = run_demo(demo, os.path.join(tmp, "sync"), steps=args.steps)
    async_ = run_demo(demo, os.path.join(tmp, "async"), steps=args.steps,
                      extra=["trainer.one_step_off=true"])

    def table(title: str, runs: dict, label: str) -> None:
        print(f"\n{title}\n| {label} | step s | rollout s | logprobs s | train s | sync s |")
        print("|---|---|---|---|---|---|")
        for x, r in runs.items():
            print(f"| {x} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + " |")

    if not args.demo_only:
        table("Step time vs samples per prompt (16 prompts per step)", by_samples, "samples")
        table("Step time vs prompts per step (4 samples each)", by_prompts, "prompts")
        for name, runs, per in (("samples per prompt", by_samples, 16), ("prompts per step", by_prompts, 4)):
            xs = [x * per for x in runs]
            a, b = slope(xs, [r["time/step_s"] for r in runs.values()])
            print(f"fit over {name}: step_s = {a:.2f} + {b * 1000:.1f} ms x completions")
    modes = {"synchronous, log-probs after generation": after, "synchronous, log-probs streamed": sync,
             "one-step-off": async_}
    table("The demo's RL step (configs/cpu_demo.yaml, 64 prompts x 4, 4 updates)", modes, "mode")
    print(f"\nWhere the CPU went: CPU seconds per step of each role's processes (busy: the whole machine), "
          f"steal: the hypervisor's for other guests; and the cores kept busy ({os.cpu_count()} here)")
    print("| mode | learner | rollout | verifier | driver | busy | steal | cores busy |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in modes.items():
        cells = (r["cpu"][k] for k in (*dict(ROLES), "driver", "busy", "steal", "cores"))
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
    names = list(async_["memory"])
    print("\nPeak resident memory of each process, GB (its own VmHWM; children's PSS at the end in brackets)")
    print("| mode | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for name, r in modes.items():
        cells = []
        for proc in names:
            m = r["memory"].get(proc, {})
            kids = f" (+{m['children_pss_gb']:.2f})" if "children_pss_gb" in m else ""
            cells.append(f"{m['peak_rss_gb']:.2f}{kids}" if "peak_rss_gb" in m else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    learn = after["time/logprobs_s"] + after["time/train_s"]
    bound = max(after["time/rollout_s"], learn)
    print(f"\nsynchronous: rollout {after['time/rollout_s']:.2f} s, log-probs + train {learn:.2f} s; "
          f"log-probs streamed during generation: step {sync['time/step_s']:.2f} s = "
          f"{after['time/step_s'] / sync['time/step_s']:.2f}x faster than after it")
    print(f"one-step-off: step {async_['time/step_s']:.2f} s = {async_['time/step_s'] / bound:.2f}x "
          f"max(rollout, log-probs + train) (target <= 1.15x), "
          f"{after['time/step_s'] / async_['time/step_s']:.2f}x faster than synchronous")
    if args.demo_only:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, runs, per, label in ((axes[0], by_samples, 16, "samples per prompt (16 prompts)"),
                                 (axes[1], by_prompts, 4, "prompts per step (4 samples)")):
        xs = list(runs)
        for k in KEYS:
            ax.plot(xs, [runs[x][k] for x in xs], marker="o", label=k.split("/")[1])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, "scaling.png")
    fig.savefig(path, dpi=90)
    print(f"curves: {path}")


if __name__ == "__main__":
    main()
