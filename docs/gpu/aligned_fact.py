"""Whether the compiled CalibRL loss graph knows its length is a multiple of 16 (ad hoc; any device).

    python3 docs/gpu/aligned_fact.py

For `compile_loss_kernels(length_multiple=16)` (`benchmarks/loss_device.py`'s `length aligned`):
compiles the loss kernel as a learner does (every dimension dynamic), plain and wrapped by
`losses._length_multiple_of`, through a backend that
asks inductor's size reasoning (`statically_known_multiple_of`, what `config_of` asks before giving
a Triton argument the divisible-by-16 hint) about each (B, T) input's length. Prints one line each.
"""
import os
import sys

sys.path[:0] = [os.getcwd(), "scripts", "benchmarks"]
import torch
from gpu_check import loss_inputs, loss_steps
from torch._inductor.sizevars import SizeVarAllocator

from calibrl.algo import compile_loss_kernels, losses

plain = losses._calibrl_terms
for name, kernel in (("plain", plain), ("aligned", losses._length_multiple_of(plain, 16))):
    known = set()

    def backend(gm, example_inputs, known=known):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        sizes = SizeVarAllocator(tensors[0].fake_mode.shape_env)
        for t in tensors:
            if t.dim() == 2 and isinstance(t.shape[1], torch.SymInt):
                known.add((str(t.shape[1]), sizes.statically_known_multiple_of(t.shape[1].node.expr, 16)))
        return gm

    torch._dynamo.reset()
    losses._calibrl_terms = kernel
    compile_loss_kernels(backend=backend)
    loss_steps(loss_inputs(16, 1024, torch.device("cpu")))[0]()
    print(f"{name}: length symbol, known a multiple of 16: {sorted(known)}")
