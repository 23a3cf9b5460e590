import os, sys, time, statistics
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "scripts")
import torch
from torch.profiler import profile, ProfilerActivity
import gpu_check as g
from calibrl.algo import calibrl_loss, ppo_loss, compile_loss_kernels

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compile_loss_kernels(True)
for rows in (16, 8192):
    t = g.loss_inputs(rows, 1024, dev)
    def calib(back=True):
        logp = t["logp"].clone().requires_grad_()
        loss, _ = calibrl_loss(logp, t["old"], t["adv"], t["mask"], t["is_expert"], t["passed"], t["expert"],
                               has_expert=t["has_expert"], **t["norms"])
        if back: loss.backward()
    def grpo(back=True):
        logp = t["logp"].clone().requires_grad_()
        loss, _ = ppo_loss(logp, t["old"], t["adv"], t["mask"], t["is_expert"], **t["norms"])
        if back: loss.backward()
    for fn in (calib, grpo):
        for _ in range(5): fn()
        g.sync(dev)
        # forward-only and full timings
        for back in (False, True):
            ts = []
            for _ in range(50):
                s = time.perf_counter(); fn(back); g.sync(dev); ts.append(time.perf_counter() - s)
            print(f"{rows} {fn.__name__} {'fwd+bwd' if back else 'fwd'}: {statistics.median(ts)*1e3:.3f} ms")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(10): fn()
            g.sync(dev)
        ka = prof.key_averages()
        kern = [e for e in ka if e.device_type.name == "CUDA"] if dev.type == "cuda" else []
        n_k = sum(e.count for e in kern) / 10
        t_k = sum(e.self_device_time_total for e in kern) / 10 if kern else 0
        print(f"  kernels/iter {n_k:.0f}, kernel time/iter {t_k:.1f} us")
        for e in sorted(kern, key=lambda e: -e.self_device_time_total)[:12]:
            print(f"    K {e.count//10:3d}x {e.self_device_time_total/10:8.1f} us  {e.key[:90]}")
        cpu = sorted([e for e in ka if e.device_type.name == "CPU"], key=lambda e: -e.self_cpu_time_total)[:14]
        for e in cpu:
            print(f"    C {e.count/10:5.1f}x {e.self_cpu_time_total/10:8.1f} us  {e.key[:90]}")
