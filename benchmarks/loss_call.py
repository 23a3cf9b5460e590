"""Benchmark: the compiled loss kernel call alone, CalibRL against GRPO: fixed cost and cost per row.

    .venv/bin/python benchmarks/loss_call.py [--rows 1 16 64] [--length 1024]

`compile_loss_kernels()` as a learner runs it (one graph for every shape), then each loss's kernel
(`losses._calibrl_terms` / `losses._ppo_terms`: the whole loss with its metrics and its gradient in
logp, no autograd, none of the public functions' argument checks) called directly under no_grad, on
`scripts/gpu_check.py`'s loss inputs; also with the metrics dropped from the outputs (what returning
them costs). Median microseconds per call of alternating batches of calls, side by side in one
process, and a least-squares line through the rows: the call's fixed cost (at 0 rows) and the cost
of each further row. Inductor's options apply through its environment variables, e.g.
`TORCHINDUCTOR_SIZE_ASSERTS=0` (no size and stride checks of the inputs in the generated wrapper).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import torch
from gpu_check import loss_inputs

from calibrl.algo import compile_loss_kernels, losses

SHARED = {"agg": "token-mean", "norm_length": None, "clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": 3.0,
          "diagnostics": False}


def calls(rows: int, length: int, lean: dict) -> dict:
    """name -> a no-argument call of that compiled kernel on `rows` rows (`lean`: the kernels compiled
    without their metrics)."""
    t = loss_inputs(rows, length, torch.device("cpu"))
    kernels = losses._KERNELS
    calib_args = (t["logp"], t["old"], t["adv"], t["mask"], t["is_expert"], t["passed"], t["expert"],
                  t["has_expert"])
    calib_kw = SHARED | {"alpha": 0.5, "lam": 0.1, "calib_weight": "abs_advantage",
                         "no_expert_baseline": "none"} | t["norms"]
    grpo_args = (t["logp"], t["old"], t["adv"], t["mask"], t["is_expert"])
    grpo_kw = SHARED | t["norms"]
    return {"calibrl": lambda: kernels["calibrl"](*calib_args, **calib_kw),
            "grpo": lambda: kernels["ppo"](*grpo_args, **grpo_kw),
            "calibrl, no metrics": lambda: lean["calibrl"](*calib_args, **calib_kw),
            "grpo, no metrics": lambda: lean["ppo"](*grpo_args, **grpo_kw)}


def _without_metrics(fn):
    def run(*args, **kwargs):
        loss, grad, _ = fn(*args, **kwargs)
        return loss, grad
    return run


def time_us(fns: dict, batch: int = 200, repeats: int = 15) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            times[name].append((time.perf_counter() - start) / batch * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    compile_loss_kernels()
    lean = {name: losses._Compiled(name, _without_metrics(fn))
            for name, fn in (("calibrl", losses._calibrl_terms), ("ppo", losses._ppo_terms))}
    print(f"compiled loss kernel call alone, {args.length} tokens per row, µs per call "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    names = list(calls(1, args.length, lean))
    print("| rows | " + " | ".join(names) + " | ratio | ratio, no metrics |")
    print("|---|" + "---|" * (len(names) + 2))
    by_rows = {}
    with torch.no_grad():
        for rows in args.rows:
            us = by_rows[rows] = time_us(calls(rows, args.length, lean))
            print(f"| {rows} | " + " | ".join(f"{us[n]:.1f}" for n in names)
                  + f" | {us['calibrl'] / us['grpo']:.2f}x"
                  + f" | {us['calibrl, no metrics'] / us['grpo, no metrics']:.2f}x |", flush=True)
    if len(args.rows) >= 2:
        print()
        for name in ("calibrl", "grpo"):
            slope, fixed = statistics.linear_regression(args.rows, [by_rows[r][name] for r in args.rows])
            print(f"{name}: fixed cost {fixed:.1f} µs, {slope:.3f} µs per further row")


if __name__ == "__main__":
    main()
