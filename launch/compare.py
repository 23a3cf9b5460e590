"""`calibrl compare CONFIG [MORE.yaml] [key=value ...] --variants calibrl,grpo,... --seeds 0,1,2 [--out DIR]`

Runs one config under several methods (and ablations) and seeds, one run after another on one Ray
cluster, and writes a results directory:

    OUT/warmup/seed{S}/     the shared SFT warm-up of seed S (`trainer.sft_warmup_steps` SFT steps)
    OUT/runs/{V}/seed{S}/   variant V's RL run from that warm-up (a normal run directory)
    OUT/results.md          held-out greedy accuracy and pass@k, mean and spread over seeds
    OUT/results.json        the same numbers, per run
    OUT/*.png               reward, entropy and held-out accuracy per variant; CalibRL's diagnostics

Every variant of a seed starts from the same SFT checkpoint (its `learner/hf` export), with a fresh
optimizer, so differences come from the RL phase alone. Consequently `sft_grpo` is `grpo` here, and
the `sft` variant continues SFT for the RL phase's steps. A variant is a file
`configs/baselines/V.yaml` or `configs/ablations/V.yaml` overlaid on the config, or a method name of
`calibrl.algo.methods.METHODS` without a file. Resumable: a run with `final.json` is skipped, and an
interrupted one resumes from its last checkpoint (`trainer.resume=auto`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from calibrl.algo import METHODS, SFT_WARMUP_METHOD
from calibrl.config import load_config, split_config_args
from launch.metrics import read_metrics
from launch.report import save_plot

VARIANT_DIRS = ("configs/baselines", "configs/ablations")
CURVES = [("reward", "training reward (on-policy mean)", "reward/mean", "train"),
          ("entropy", "policy entropy on on-policy tokens (nats)", "policy/entropy", "train"),
          ("val_accuracy", "held-out greedy accuracy", "val/accuracy", "eval")]
CALIBRL_CURVES = [("calib_branches", "calibration LeakyReLU branch fractions",
                   ["train/calib_branch_full_frac", "train/calib_branch_alpha_frac"]),
                  ("expert_gap", "expert-minus-policy log-prob gap (nats/token)",
                   ["policy/expert_minus_policy_logp"])]


def variant_overlay(name: str) -> tuple[list[str], list[str]]:
    """(YAML files, overrides) that turn the base config into variant `name`."""
    files = [os.path.join(d, f"{name}.yaml") for d in VARIANT_DIRS
             if os.path.exists(os.path.join(d, f"{name}.yaml"))]
    if files:
        return files[:1], []
    if name in METHODS:
        return [], [f"algorithm.name={name}"]
    known = sorted({f[:-5] for d in VARIANT_DIRS if os.path.isdir(d)
                    for f in os.listdir(d) if f.endswith(".yaml")}
                   | set(METHODS))
    raise SystemExit(f"calibrl compare: unknown variant {name!r}; known: {', '.join(known)}")


def _train_once(configs: list[str], overrides: list[str], out_dir: str, label: str) -> dict:
    """Train one run unless OUT_DIR/final.json exists; returns the final held-out metrics."""
    from launch.train import train

    done = os.path.join(out_dir, "final.json")
    if os.path.exists(done):
        print(f"[compare] {label}: done earlier, skipped", file=sys.stderr, flush=True)
        with open(done) as f:
            return json.load(f)
    t0 = time.time()
    print(f"[compare] {label}: training -> {out_dir}", file=sys.stderr, flush=True)
    final = train(load_config(configs, [*overrides, f"trainer.output_dir={out_dir}", "trainer.resume=auto"]))
    with open(done + ".tmp", "w") as f:
        json.dump(final, f, indent=2)
    os.replace(done + ".tmp", done)
    print(f"[compare] {label}: val/accuracy={final.get('val/accuracy', float('nan')):.3f} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return final


def run_compare(configs: list[str], overrides: list[str], *, variants: list[str], seeds: list[int],
                out: str) -> str:
    """Warm up each seed once, train every variant from it, write the results; returns results.md."""
    overlays = {v: variant_overlay(v) for v in variants}  # unknown names fail before anything runs
    base = load_config(configs, overrides)
    sft_steps = base.trainer.sft_warmup_steps
    total = len(seeds) * (len(variants) + (1 if sft_steps else 0))
    k = 0
    for seed in seeds:
        model = base.model.path
        if sft_steps:
            k += 1
            warm = os.path.join(out, "warmup", f"seed{seed}")
            _train_once(configs, [*overrides, f"trainer.seed={seed}", f"algorithm.name={SFT_WARMUP_METHOD}",
                                  "trainer.sft_warmup_steps=0", f"trainer.total_steps={sft_steps}",
                                  f"learner.lr={base.learner.sft_lr or base.learner.lr}",
                                  "trainer.eval_every_steps=0", "trainer.save_every_steps=0"],
                        warm, f"[{k}/{total}] SFT warm-up, seed {seed}")
            model = os.path.join(warm, "checkpoints", f"step_{sft_steps:06d}", "learner", "hf")
        for v in variants:
            k += 1
            files, extra = overlays[v]
            _train_once([*configs, *files], [*overrides, *extra, f"trainer.seed={seed}",
                                             f"model.path={model}", "trainer.sft_warmup_steps=0"],
                        os.path.join(out, "runs", v, f"seed{seed}"), f"[{k}/{total}] {v}, seed {seed}")
    path = write_results(out, variants=variants, seeds=seeds)
    with open(path) as f:
        print(f.read(), flush=True)
    return path


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _fmt(xs: list[float]) -> str:
    m, sd = _mean_sd(xs)
    return f"{m:.3f} ± {sd:.3f}" if xs else "n/a"


def write_results(out: str, *, variants: list[str], seeds: list[int]) -> str:
    """results.md, results.json and the PNG curves from the runs' metrics.jsonl files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, dict[int, list[dict]]] = {}
    for v in variants:
        for s in seeds:
            d = os.path.join(out, "runs", v, f"seed{s}")
            if os.path.exists(os.path.join(d, "final.json")):
                runs.setdefault(v, {})[s] = read_metrics(d)
    per_run = {}
    for v, by_seed in runs.items():
        for s, records in by_seed.items():
            evals = [r for r in records if r.get("kind") == "eval"]
            train = [r for r in records if r.get("kind") == "train"]
            ent = [r["policy/entropy"] for r in train if "policy/entropy" in r]
            per_run[f"{v}/seed{s}"] = {
                "start_accuracy": evals[0].get("val/accuracy"),
                "start_prompt_dependence": evals[0].get("val/prompt_dependence"),
                "final_accuracy": evals[-1].get("val/accuracy"),
                "start_pass_at_k": evals[0].get("val/pass_at_k"),
                "final_pass_at_k": evals[-1].get("val/pass_at_k"),
                "final_format_rate": evals[-1].get("val/format_rate"),
                "entropy_first": ent[0] if ent else None, "entropy_last": ent[-1] if ent else None,
                "steps": train[-1]["step"] if train else 0, "wall_s": records[-1].get("time_s")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(per_run, f, indent=2)

    lines = [f"# calibrl compare: {out}", "",
             (f"Held-out greedy accuracy and pass@k, mean ± sample sd over seeds "
              f"{', '.join(map(str, seeds))}."),
             "Start = the shared SFT warm-up checkpoint (identical for every variant of a seed).", "",
             ("| variant | seeds | start acc | final acc | gain | gain per seed | final pass@k "
              "| final format | entropy first -> last |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rows = [per_run[f"{v}/seed{s}"] for s in seeds if f"{v}/seed{s}" in per_run]
        if not rows:
            lines.append(f"| {v} | 0 | | | | | | | |")
            continue

        def col(key: str, rows=rows) -> list[float]:
            return [r[key] for r in rows if r[key] is not None]

        gains = [r["final_accuracy"] - r["start_accuracy"] for r in rows]
        m0, _ = _mean_sd(col("entropy_first"))
        m1, _ = _mean_sd(col("entropy_last"))
        per_seed = ", ".join(f"{g:+.3f}" for g in gains)
        lines.append(f"| {v} | {len(rows)} | {_fmt(col('start_accuracy'))} | {_fmt(col('final_accuracy'))} | "
                     f"{_fmt(gains)} | {per_seed} | {_fmt(col('final_pass_at_k'))} | "
                     f"{_fmt(col('final_format_rate'))} | "
                     f"{m0:.3f} -> {m1:.3f} |")
    deps = [r["start_prompt_dependence"] for r in per_run.values()
            if r["start_prompt_dependence"] is not None]
    if deps:
        lines += ["", (f"How much the SFT starts read their prompt: val/prompt_dependence {min(deps):.3f} to "
                       f"{max(deps):.3f} nats/token (about 0 for a model that answers the same whatever "
                       "it is asked).")]
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

    def plot(name: str, title: str, series: list[tuple[str, list[list[tuple[int, float]]]]]) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for label, curves in series:
            steps = sorted({x for c in curves for x, _ in c})
            if not steps:
                continue
            means = [sum(dict(c).get(x, math.nan) for c in curves) / len(curves) for x in steps]
            ax.plot(steps, means, marker="o" if len(steps) < 15 else None, label=label)
        save_plot(fig, ax, title=title, xlabel="RL step (mean over seeds)",
                  path=os.path.join(out, f"{name}.png"))

    def curve(records: list[dict], key: str, kind: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records
                if r.get("kind") == kind and isinstance(r.get(key), (int, float))]

    for name, title, key, kind in CURVES:
        plot(name, title, [(v, [curve(recs, key, kind) for recs in by_seed.values()])
                           for v, by_seed in runs.items()])
    # the variants that log calibration diagnostics (CalibRL and its ablations)
    calib = [v for v, by_seed in runs.items()
             if any("train/calib_branch_full_frac" in r for recs in by_seed.values() for r in recs)]
    for name, title, keys in CALIBRL_CURVES:
        plot(name, title, [(f"{v}: {k.split('/')[-1]}",
                            [curve(recs, k, "train") for recs in runs[v].values()])
                           for v in calib for k in keys])
    return path


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="calibrl compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("args", nargs="+", help="CONFIG.yaml [MORE.yaml ...] [key=value ...]")
    ap.add_argument("--variants", "--algorithms", dest="variants", default="calibrl,grpo,dapo,luffy,rlplus",
                    help="comma-separated methods or ablation/baseline files")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--out", default="runs/compare", help="results directory")
    ns = ap.parse_intermixed_args(argv)  # key=value overrides may follow the options too
    configs, overrides = split_config_args(ns.args)
    run_compare(configs, overrides, variants=[v for v in ns.variants.split(",") if v],
                seeds=[int(s) for s in ns.seeds.split(",") if s], out=ns.out)
