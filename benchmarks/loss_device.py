"""Benchmark: calibrl_loss against the GRPO loss on one device (wall and kernel time), by how it is compiled.

    python3 benchmarks/loss_device.py [--device cuda] [--rows 16 8192] [--length 1024] [--variants ...]

Forward + backward of each loss with its metrics (the inputs of `scripts/gpu_check.py`'s loss
timing: groups of 15 samples + 1 expert, random lengths), median of alternating synchronised runs,
and, on CUDA, the GPU time of the kernels one call launches (torch.profiler, 10 calls). Each
variant runs in its own process:
- `eager`: no compiler (a CPU learner's default);
- `compiled`: `compile_loss_kernels()` as a learner runs it (every dimension dynamic from the first
  call, so micro-batches of any rows and length share one graph; a CUDA learner's default);
- `static`: the same with shapes left static (a graph per shape: what the dynamic shapes cost);
- `rows dynamic` / `length dynamic`: only the rows (dimension 0 of every input) or only the length
  (dimension 1 of the (B, T) inputs) dynamic: which of the two the dynamic graph pays for;
- `length aligned`: `compiled` with `compile_loss_kernels(length_multiple=16)`, the losses telling the
  compiler that the length is a multiple of 16 (`torch._check` in the graph), as a CUDA learner does
  whose batches it pads so (`learner.pad_to_multiple_of`; the inputs here are 1024 long). With every
  dimension dynamic, inductor cannot otherwise prove a row's stride (the length) a multiple of 16, so
  Triton gets no divisibility hint for the row offsets and loads a token at a time;
- `compiled+coord`: `compiled` with inductor's coordinate-descent tuning of the kernels.
Prints a table and the calibrl / GRPO ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

VARIANTS = {"eager": {}, "compiled": {}, "static": {"CALIBRL_BENCH_DYNAMIC_DIMS": ""},
            "rows dynamic": {"CALIBRL_BENCH_DYNAMIC_DIMS": "0"},
            "length dynamic": {"CALIBRL_BENCH_DYNAMIC_DIMS": "1"},
            "length aligned": {"CALIBRL_BENCH_ALIGN": "16"},
            "compiled+coord": {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}}


def measure(variant: str, device_name: str, rows: int, length: int, repeats: int) -> list[float]:
    """[calibrl wall s, grpo wall s, calibrl kernel s, grpo kernel s, calibrl launches, grpo launches]."""
    import torch
    from gpu_check import loss_inputs, loss_steps, sync
    from torch.profiler import ProfilerActivity, profile

    from calibrl.algo import compile_loss_kernels

    device = torch.device(device_name)
    dims = os.environ.get("CALIBRL_BENCH_DYNAMIC_DIMS")
    if dims is not None:  # mark only these dimensions dynamic (0: rows, 1: length; none: all static)
        keep, mark = {int(d) for d in dims.split(",") if d}, torch._dynamo.maybe_mark_dynamic
        torch._dynamo.maybe_mark_dynamic = lambda t, dim: mark(t, dim) if dim in keep else None
    # length aligned: as a learner with learner.pad_to_multiple_of (the inputs are 1024 long)
    compile_loss_kernels(variant != "eager", length_multiple=int(os.environ.get("CALIBRL_BENCH_ALIGN", "1")))
    calib, grpo = loss_steps(loss_inputs(rows, length, device))

    fns = (calib, grpo)
    for _ in range(3):
        for fn in fns:
            fn()
    sync(device)
    walls = {fn: [] for fn in fns}
    for _ in range(repeats):
        for fn in fns:
            start = time.perf_counter()
            fn()
            sync(device)
            walls[fn].append(time.perf_counter() - start)
    kernel, launches = {}, {}
    for fn in fns:
        kernel[fn], launches[fn] = float("nan"), float("nan")
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                sync(device)
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernel[fn] = sum(e.self_device_time_total for e in events) / 10 * 1e-6
            launches[fn] = sum(e.count for e in events) / 10
    return [statistics.median(walls[calib]), statistics.median(walls[grpo]), kernel[calib], kernel[grpo],
            launches[calib], launches[grpo]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 512, 8192])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (default: all)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(*measure(args.one[0], args.device, int(args.one[1]), args.length, args.repeats))
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("loss_device: no CUDA device visible (--device cpu runs it on the CPU)")
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"calibrl_loss vs the GRPO loss, forward + backward, {args.length} tokens per row, on {name} "
          f"(torch {torch.__version__})\n")
    print("| variant | rows | calibrl wall ms | GRPO wall ms | ratio | calibrl kernels us | GRPO kernels us "
          "| ratio | launches |\n|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        env = VARIANTS[variant]
        for rows in args.rows:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--device", args.device,
                                   "--length", str(args.length), "--repeats", str(args.repeats),
                                   "--one", variant, str(rows)],
                                  env={**os.environ, **env}, capture_output=True, text=True, check=False)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                print(f"| {variant} | {rows} | failed: {last} |")
                continue
            cw, gw, ck, gk, cl, gl = map(float, proc.stdout.split()[-6:])
            kernels = (f"{ck * 1e6:.1f} | {gk * 1e6:.1f} | {ck / gk:.2f}x | {cl:.0f} / {gl:.0f}"
                       if not math.isnan(ck) else "- | - | - | -")
            print(f"| {variant} | {rows} | {cw * 1e3:.3f} | {gw * 1e3:.3f} | {cw / gw:.2f}x | {kernels} |",
                  flush=True)


if __name__ == "__main__":
    main()
