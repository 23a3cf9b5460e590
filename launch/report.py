"""`calibrl report RUN_DIR`: PNG plots and a markdown summary from a run's metrics.jsonl."""

from __future__ import annotations

import os

from launch.memory import last_memory
from launch.metrics import read_metrics

PLOTS = [
    ("reward", "training reward (mean over on-policy responses)", ["reward/mean"]),
    ("val_accuracy", "held-out greedy accuracy", ["val/accuracy"]),
    ("entropy", "policy entropy (nats/token)", ["policy/entropy", "policy/expert_entropy"]),
    ("calibration_loss", "losses", ["loss/calib", "loss/pg"]),
    ("phase_timings", "time per phase (s)", ["time/rollout_s", "time/verify_s", "time/calibrate_s",
                                              "time/logprobs_s", "time/train_s", "time/sync_s"]),
]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def save_plot(fig, ax, *, title: str, xlabel: str, path: str) -> None:
    """Title, grid, legend (when something was drawn), save as PNG and close."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(run_dir: str) -> str:
    """Writes RUN_DIR/report/*.png and RUN_DIR/report/summary.md; returns the summary path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    for name, title, keys in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            xs, ys = _series(records, k)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=k)
        save_plot(fig, ax, title=title, xlabel="step", path=os.path.join(out, f"{name}.png"))

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    lines = [f"# calibrl run report: `{run_dir}`", ""]
    if train:
        last = train[-1]
        lines += [f"- training steps logged: {len(train)} (last step {last['step']})",
                  f"- wall time: {last.get('time_s', 0):.0f} s"]
        for k in ("reward/mean", "acc/mean", "policy/entropy", "loss/calib", "perf/tokens_per_s"):
            if k in last:
                lines.append(f"- last {k}: {last[k]:.4f}")
    if evals:
        lines += ["", "## Held-out evaluation", "",
                  "| step | phase | greedy accuracy | pass@k | format rate | mean length |",
                  "|---|---|---|---|---|---|"]
        for r in evals:
            lines.append(f"| {r['step']} | {r.get('phase', '')} | "
                         f"{r.get('val/accuracy', float('nan')):.3f} | "
                         f"{r.get('val/pass_at_k', float('nan')):.3f} | "
                         f"{r.get('val/format_rate', float('nan')):.3f} | "
                         f"{r.get('val/response_length', float('nan')):.1f} |")
        first, last = evals[0], evals[-1]
        lines += ["", (f"Greedy accuracy went from {first.get('val/accuracy', 0):.3f} "
                      f"({first.get('phase', 'start')}) to {last.get('val/accuracy', 0):.3f} "
                      f"({last.get('phase', 'end')}, step {last['step']}).")]
        sft = [r for r in evals if r.get("phase") == "after SFT warm-up"]
        if sft:
            lines.append(f"After the SFT warm-up alone it was {sft[0].get('val/accuracy', 0):.3f}; "
                         f"the RL steps moved it by "
                         f"{last.get('val/accuracy', 0) - sft[0].get('val/accuracy', 0):+.3f}.")
        per_source = sorted(k for k in last if k.startswith("val/accuracy/"))
        if per_source:
            lines += ["", "Per data source (last evaluation):", ""]
            lines += [f"- {k.removeprefix('val/accuracy/')}: {last[k]:.3f}" for k in per_source]
    memory = last_memory(records)
    if memory:
        lines += ["", "## Memory per process (GB)", "",
                  ("Each actor's process and the driver's, as last sampled (actors/memory.py): its peak and "
                   "current resident memory, its child processes' proportional share now, and on a GPU "
                   "torch's peak allocation there."), "",
                  "| process | peak resident | resident | children (PSS) | GPU peak |",
                  "|---|---|---|---|---|"]
        for name, m in memory.items():
            cells = (f"{m[k]:.2f}" if k in m else "-" for k in ("peak_rss_gb", "rss_gb", "children_pss_gb",
                                                                "gpu_peak_gb"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Plots: " + ", ".join(f"[{n}]({n}.png)" for n, _, _ in PLOTS), ""]
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
