"""The global loads and stores in the GPU kernels of the compiled losses, built on a machine without a
GPU (ad hoc; needs the Triton wheel that comes with torch's CUDA builds, as in this project's .venv).

    .venv/bin/python docs/gpu/triton_loads.py

For `compile_loss_kernels(length_multiple=16)` (`learner.pad_to_multiple_of`): whether the length
stated a multiple of 16 changes the instructions the kernels load with. Each loss (CalibRL, GRPO)
is compiled as a learner compiles it (every dimension dynamic), without and with the length
multiple, and with static shapes (a graph per shape: what the H200 timed 4.6x faster), each in its
own process. Inductor is asked for Triton kernels on the CPU tensors
(`cpu_backend="triton"`), with the input pointers taken as aligned (what it assumes of CUDA inputs,
`should_assume_input_aligned`); each kernel, when inductor would compile it for the device, is
compiled by `triton.compile` for an sm_90 GPU (H100 / H200) instead, which needs no driver, with
the first of inductor's block-size configs for it. Prints, per kernel, the PTX's global loads and
stores by width: `b32` one float a thread, `v4.b32` four.

This shows which instructions the kernels use, not how fast they run: the block sizes inductor
picks for a real GPU differ, and only a GPU can time them (`benchmarks/loss_device.py`).
"""
import collections
import contextlib
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def kernels(which: str, multiple: int) -> list[tuple[str, str]]:
    """[(kernel name, PTX)] of `which` loss's compiled graph (run in a fresh process); `multiple` 0:
    shapes static (no dimension marked dynamic; 64 x 1024)."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.runtime.triton_heuristics as heuristics
    import torch.utils._triton as torch_triton
    import triton
    from torch._inductor import compile_fx, graph
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    inductor_config.cpu_backend = "triton"
    torch_triton.triton_hash_with_backend = lambda: "no-driver"  # a cache key; asks the driver otherwise
    graph.should_assume_input_aligned = compile_fx.should_assume_input_aligned = lambda example: True
    built = []

    def precompile(self, *args, **kwargs):
        meta = self._create_compile_meta(self.configs[0])
        binary = triton.compile(ASTSource(self.fn, meta["signature"], meta["constants"], meta["configs"][0]),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": self.configs[0].num_warps,
                                         "num_stages": self.configs[0].num_stages})
        if (self.fn.__name__, binary.asm["ptx"]) not in built:  # the same kernel again: once
            built.append((self.fn.__name__, binary.asm["ptx"]))

    heuristics.CachingAutotuner.precompile = precompile
    from gpu_check import loss_inputs, loss_steps

    from calibrl.algo import compile_loss_kernels

    if multiple == 0:
        torch._dynamo.maybe_mark_dynamic = lambda tensor, dim: None
    compile_loss_kernels(length_multiple=max(multiple, 1))
    calib, grpo = loss_steps(loss_inputs(64, 1024, torch.device("cpu")))
    with contextlib.suppress(Exception):  # the kernels were built for a GPU: they cannot run here
        (calib if which == "calibrl" else grpo)()
    return built


def widths(ptx: str) -> str:
    ops = re.findall(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?\.((?:v[24]\.)?b(?:8|16|32|64))\b", ptx)
    counts = collections.Counter(f"{op} {width}" for op, width in ops)
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def main() -> None:
    if len(sys.argv) == 3:
        for name, ptx in kernels(sys.argv[1], int(sys.argv[2])):
            print(f"{name}\t{widths(ptx)}")
        return
    print("global loads (ld) and stores (st) in the PTX of each kernel, sm_90, by width\n")
    print("| loss | length | kernel | loads and stores |")
    print("|---|---|---|---|")
    for which in ("calibrl", "grpo"):
        for multiple, label in ((1, "dynamic"), (16, "dynamic, a multiple of 16"), (0, "static")):
            out = subprocess.run([sys.executable, __file__, which, str(multiple)], check=True,
                                 capture_output=True, text=True).stdout
            for i, line in enumerate(out.strip().splitlines()):
                name, counts = line.split("\t")
                print(f"| {which} | {label} | {i}: {name[:40]}... | {counts} |", flush=True)


if __name__ == "__main__":
    main()
