"""Benchmark: how a step's cost grows, and what one-step-off buys, on the CPU demo's model and task.

    .venv/bin/python benchmarks/scaling.py            # samples 2..16 at 16 prompts; prompts 8..128 at n=4
    .venv/bin/python benchmarks/scaling.py --quick    # fewer points

For each setting: GRPO from the tiny text model, 1 warm-up step and `--steps` timed steps (medians of
the driver's `time/*` metrics), all in one Ray session. Then the demo's shape (64 prompts x 4)
synchronous and with `trainer.one_step_off=true`, side by side: one-step-off's step time against
max(rollout, train) of the synchronous run (target <= 1.15x). Prints the tables and the fitted slopes
(seconds per sample, least squares), and writes `scaling.png` (the curves) to --out.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEYS = ("time/step_s", "time/rollout_s", "time/logprobs_s", "time/train_s", "time/sync_s")


def run(model: str, data: dict, out: str, *, prompts: int, samples: int, steps: int, extra=()) -> dict:
    from calibrl.config import load_config
    from launch.metrics import read_metrics
    from launch.train import Trainer

    cfg = load_config(None, [
        f"model.path={model}", "model.max_model_len=512", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['val']}]", "data.max_prompt_length=400", "algorithm.name=grpo",
        "algorithm.std_normalize=true", "algorithm.mixup=never", f"rollout.samples_per_prompt={samples}",
        "rollout.max_response_length=48", "rollout.kv_cache_memory_mib=256",
        "rollout.stream_chunk_prompts=4",
        f"trainer.prompts_per_step={prompts}", f"learner.mini_batch_prompts={prompts}",
        f"learner.micro_batch_per_device={8 if prompts * samples % 8 == 0 else 2}",
        f"trainer.total_steps={steps + 1}", "trainer.eval_max_prompts=1", "trainer.eval_pass_k=0",
        "trainer.eval_every_steps=0", "trainer.save_every_steps=0", f"trainer.output_dir={out}",
        "trainer.resume=never", "trainer.log_level=info", *extra])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    rows = [r for r in read_metrics(out) if r["kind"] == "train"][1:]
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in KEYS}


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-scaling")
    args = ap.parse_args()

    from calibrl.data.synthetic import write_splits
    from calibrl.tiny_models import make_tiny_qwen2

    tmp = tempfile.mkdtemp(prefix="calibrl-scaling-")
    model = make_tiny_qwen2(os.path.join(tmp, "tiny-qwen2"))
    data = write_splits(os.path.join(tmp, "data"), n_train=1024, n_val=8, n_test=8, seed=0, multimodal=False,
                        difficulty=1)
    os.makedirs(args.out, exist_ok=True)
    samples = [2, 4, 8, 16] if args.quick else [2, 4, 6, 8, 12, 16]
    prompts = [8, 32, 128] if args.quick else [8, 16, 32, 64, 128]
    by_samples = {n: run(model, data, os.path.join(tmp, f"n{n}"), prompts=16, samples=n, steps=args.steps)
                  for n in samples}
    by_prompts = {p: run(model, data, os.path.join(tmp, f"p{p}"), prompts=p, samples=4, steps=args.steps)
                  for p in prompts}
    sync = run(model, data, os.path.join(tmp, "sync"), prompts=64, samples=4, steps=args.steps)
    async_ = run(model, data, os.path.join(tmp, "async"), prompts=64, samples=4, steps=args.steps,
                 extra=["trainer.one_step_off=true"])

    def table(title: str, runs: dict, label: str) -> None:
        print(f"\n{title}\n| {label} | step s | rollout s | logprobs s | train s | sync s |")
        print("|---|---|---|---|---|---|")
        for x, r in runs.items():
            print(f"| {x} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + " |")

    table("Step time vs samples per prompt (16 prompts per step)", by_samples, "samples")
    table("Step time vs prompts per step (4 samples each)", by_prompts, "prompts")
    for name, runs, per in (("samples per prompt", by_samples, 16), ("prompts per step", by_prompts, 4)):
        xs = [x * per for x in runs]
        a, b = slope(xs, [r["time/step_s"] for r in runs.values()])
        print(f"fit over {name}: step_s = {a:.2f} + {b * 1000:.1f} ms x completions")
    bound = max(sync["time/rollout_s"], sync["time/train_s"] + sync["time/logprobs_s"])
    learn = sync["time/logprobs_s"] + sync["time/train_s"]
    print(f"\nDemo shape, 64 prompts x 4: synchronous step {sync['time/step_s']:.2f} s (rollout "
          f"{sync['time/rollout_s']:.2f}, log-probs + train {learn:.2f}); "
          f"one-step-off {async_['time/step_s']:.2f} s = {async_['time/step_s'] / bound:.2f}x max(rollout, "
          f"log-probs + train) (target <= 1.15x), {sync['time/step_s'] / async_['time/step_s']:.2f}x faster")

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
