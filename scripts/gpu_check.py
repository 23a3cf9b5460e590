"""GPU check without Ray or vLLM: calibrl's losses and one DeepSpeed learner rank on a CUDA device.

    python3 scripts/gpu_check.py [--out DIR] [--device cuda]

For a GPU machine that has PyTorch and transformers but not the whole stack (`scripts/gpu_smoke.sh`
needs Ray and vLLM's CUDA build there); the learner needs DeepSpeed and omegaconf. Nothing is
downloaded: the tiny models are built here. Each check prints one line; the results go to
DIR/gpu_check.json (default: a temporary folder). Exit 1 if a check fails, 2 with no CUDA device.

1. losses: every method's loss (`METHODS`) on the device, eager and compiled by
   `compile_loss_kernels()` (inductor -> Triton, a CUDA learner's default), against the same loss
   in float64 on the CPU: loss, gradient and metrics (the batches of tests/algo/_random_batch.py).
2. recompiles: three more batches of other rows, lengths and normalisers reuse the compiled graphs
   (`error_on_recompile`); then every loss again, compiled with `length_multiple=16` on the batch
   padded to a length of 16, as a CUDA learner runs it (`learner.pad_to_multiple_of`).
3. loss time: calibrl_loss and the GRPO loss, forward + backward with metrics, eager and compiled,
   16 / 64 / 512 / 8192 rows x 1024 tokens; median of alternating synchronised runs.
4. learner: `actors.learner.Learner` as one rank (NCCL, bf16; each in its own process) on the tiny
   Qwen2 at ZeRO-2 and ZeRO-3 and on the tiny Qwen2.5-VL (images) at ZeRO-2: its log-probs against
   transformers' float32 forward on the CPU, 6 SFT then 4 CalibRL updates of one batch (each
   must lower its loss; the loss compiled), the weight export against the gathered weights, and its
   memory as a run logs it (actors/memory.py: peak RSS, and torch's peak on the GPU).

`--device cpu` runs the same checks on the CPU (gloo, float32): how the script itself is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch

KNOBS = {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 3.0, "alpha": 0.5, "lam": 0.1}
RESULTS: list[dict] = []


def report(check: str, ok: bool, **values) -> None:
    RESULTS.append({"check": check, "ok": bool(ok), **values})
    shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"gpu_check: {'ok  ' if ok else 'FAIL'} {check}: {shown}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1-3: the losses --------------------------------------------------------------------------


def random_batch(groups: int, seed: int):
    path = os.path.join(ROOT, "tests", "algo", "_random_batch.py")
    spec = importlib.util.spec_from_file_location("_random_batch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_batch(groups, seed=seed)


def batch_as(batch, device: torch.device, dtype: torch.dtype):
    """A copy of the batch on `device`, its float tensors in `dtype`."""
    from calibrl.algo import TrainBatch

    return TrainBatch(**{k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                         if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})


def run_loss(name: str, logp0: torch.Tensor, batch):
    from calibrl.algo import compute_loss, loss_normalizers

    logp = logp0.clone().requires_grad_()
    loss, metrics = compute_loss(name, logp, batch, **loss_normalizers(name, batch), **KNOBS)
    loss.backward()
    metrics = {k: v.double().cpu() for k, v in metrics.items()}
    return loss.detach().double().cpu(), logp.grad.double().cpu(), metrics


def largest_gap(a, b) -> float:
    (la, ga, ma), (lb, gb, mb) = a, b
    gaps = [(la - lb).abs().max(), (ga - gb).abs().max()] + [(ma[k] - mb[k]).abs().max() for k in ma]
    return max(float(g) for g in gaps)


def check_losses(device: torch.device) -> None:
    from calibrl.algo import METHODS, compile_loss_kernels, compute_loss, loss_normalizers

    batch = random_batch(6, seed=5)
    gen = torch.Generator().manual_seed(5)
    logp0 = (batch.old_logp + 0.4 * torch.randn(batch.old_logp.shape, generator=gen)).clamp(max=-1e-3)
    reference = {n: run_loss(n, logp0.double(), batch_as(batch, torch.device("cpu"), torch.float64))
                 for n in METHODS}
    on_device = batch_as(batch, device, torch.float32)
    eager = {n: run_loss(n, logp0.to(device), on_device) for n in METHODS}
    compile_loss_kernels()
    try:
        t0 = time.perf_counter()
        fused = {n: run_loss(n, logp0.to(device), on_device) for n in METHODS}
        first_s = time.perf_counter() - t0
        for n in METHODS:
            assert fused[n][2].keys() == eager[n][2].keys(), n
            e, f = largest_gap(eager[n], reference[n]), largest_gap(fused[n], reference[n])
            report(f"loss {n}", e < 1e-5 and f < 1e-5, eager_vs_float64=e, compiled_vs_float64=f,
                   grad_sum=float(reference[n][1].abs().sum()))
        report("loss compile (all methods, first calls)", True, seconds=first_s)
        for i, (groups, seed) in enumerate([(3, 11), (5, 12), (4, 13)]):
            b = batch_as(random_batch(groups, seed=seed), device, torch.float32)
            patch = torch._dynamo.config.patch(error_on_recompile=True)
            try:
                with patch:
                    for name in ("calibrl", "grpo"):
                        norms = {k: v * (2 + i) for k, v in loss_normalizers(name, b).items()}
                        logp = b.old_logp.clone().requires_grad_()
                        loss, _ = compute_loss(name, logp, b, **norms, **KNOBS)
                        loss.backward()
                ok, why = True, ""
            except torch._dynamo.exc.RecompileError as err:
                ok, why = False, str(err).splitlines()[0][:160]
            shape = tuple(b.response_ids.shape)
            report(f"no recompile, batch {i + 1} ({shape})", ok, **({"error": why} if why else {}))
    finally:
        compile_loss_kernels(False)
    # a CUDA learner's defaults: the batch padded to a length of a multiple of 16, the losses told so
    compile_loss_kernels(length_multiple=16)
    try:
        padded = batch_as(batch.pad_responses(16), device, torch.float32)
        width = batch.old_logp.shape[1]
        logp16 = torch.nn.functional.pad(logp0, (0, padded.old_logp.shape[1] - width)).to(device)
        for n in METHODS:
            loss, grad, metrics = run_loss(n, logp16, padded)
            gap = largest_gap((loss, grad[:, :width], metrics), reference[n])
            report(f"loss {n}, length padded to a multiple of 16", gap < 1e-5 and not grad[:, width:].any(),
                   compiled_vs_float64=gap, length=int(padded.old_logp.shape[1]))
    finally:
        compile_loss_kernels(False)


def loss_inputs(rows: int, length: int, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=gen) * 3
    mask = torch.arange(length) < torch.randint(length // 4, length + 1, (rows, 1), generator=gen)
    is_expert = torch.zeros(rows, dtype=torch.bool)
    is_expert[15::16] = True  # groups of 15 samples + 1 expert
    adv = torch.randn(rows, generator=gen)
    t = {"logp": old + 0.1 * torch.randn(rows, length, generator=gen), "old": old, "adv": adv, "mask": mask,
         "is_expert": is_expert, "passed": adv > 0, "expert": old - torch.rand(rows, length, generator=gen),
         "has_expert": torch.ones(rows, dtype=torch.bool)}
    t = {k: v.to(device) for k, v in t.items()}
    on_policy = t["mask"] & ~t["is_expert"].unsqueeze(-1)
    t["norms"] = {"global_tokens": float(on_policy.sum()), "global_seqs": float(on_policy.any(-1).sum())}
    return t


def loss_steps(t: dict):
    """(calibrl, GRPO): each a forward + backward of that loss, metrics included, on `loss_inputs`."""
    from calibrl.algo import calibrl_loss, ppo_loss

    def calib():
        logp = t["logp"].clone().requires_grad_()
        loss, _ = calibrl_loss(logp, t["old"], t["adv"], t["mask"], t["is_expert"], t["passed"], t["expert"],
                               has_expert=t["has_expert"], **t["norms"])
        loss.backward()

    def grpo():
        logp = t["logp"].clone().requires_grad_()
        loss, _ = ppo_loss(logp, t["old"], t["adv"], t["mask"], t["is_expert"], **t["norms"])
        loss.backward()

    return calib, grpo


def loss_time(device: torch.device, rows: int, repeats: int, length: int = 1024) -> tuple[float, float]:
    calib, grpo = loss_steps(loss_inputs(rows, length, device))
    times = {calib: [], grpo: []}
    for fn in (calib, grpo, calib, grpo):  # warm-up (and compile)
        fn()
    sync(device)
    for _ in range(repeats):
        for fn, ts in times.items():
            start = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - start)
    return statistics.median(times[calib]), statistics.median(times[grpo])


def check_loss_time(device: torch.device) -> None:
    from calibrl.algo import compile_loss_kernels

    for mode in ("eager", "compiled"):
        compile_loss_kernels(mode == "compiled")
        try:
            for rows in (16, 64, 512, 8192):
                calib_s, grpo_s = loss_time(device, rows, repeats=50 if rows < 8192 else 20)
                report(f"loss time {mode}, {rows} rows", True, calibrl_ms=calib_s * 1e3, grpo_ms=grpo_s * 1e3,
                       ratio=calib_s / grpo_s)
        finally:
            compile_loss_kernels(False)


# ---- 4: one learner rank -----------------------------------------------------------------------


def learner_batch(model_path: str, *, vl: bool, groups: int = 4, n: int = 3, seed: int = 0):
    """Chat prompts (the synthetic task's; with its images for the VL model), random on-policy
    responses (every other one passes), one expert each."""
    import numpy as np
    from transformers import AutoTokenizer

    from calibrl.algo import CalibrationStage, ExpertTrajectory, Group, Response, Verdict
    from calibrl.data.synthetic import generate_examples
    from calibrl.inputs import prompt_token_ids, response_token_ids

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = np.random.default_rng(seed)
    stage = CalibrationStage(pad_token_id=tok.pad_token_id, mixup="always")
    for g, ex in enumerate(generate_examples(groups, seed=seed, split="check", multimodal=vl)):
        responses, verdicts = [], []
        for i in range(n):
            ids = rng.integers(3, 256, size=int(rng.integers(4, 12))).tolist()
            responses.append(Response(token_ids=ids, logprobs=[-5.0] * len(ids), text="x"))
            ok = (i + g) % 2 == 0
            verdicts.append(Verdict(reward=1.1 if ok else 0.0, accuracy=float(ok), format_ok=ok, passed=ok))
        expert = ex.experts[0] if ex.experts else f"<think>.</think><answer>{ex.answer}</answer>"
        experts = [ExpertTrajectory(token_ids=response_token_ids(tok, [expert])[0], text=expert)]
        stage.add(Group(prompt_id=ex.id, prompt_token_ids=prompt_token_ids(tok, ex.prompt, ex.images),
                        answer=ex.answer, responses=responses, verdicts=verdicts, experts=experts,
                        images=list(ex.images)))
    batch, _ = stage.assemble()
    return batch


def reference_logprobs(model_path: str, batch, vl: bool) -> torch.Tensor:
    """transformers' float32 forward on the CPU, the learner's maths (`response_logprobs`)."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText

    from calibrl.inputs import image_tensors
    from calibrl.modeling import response_logprobs

    cls = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    model = cls.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for r in range(batch.response_ids.shape[0]):
            mb = batch.select(torch.tensor([r]))
            vis = {}
            if vl:
                vis = image_tensors(AutoImageProcessor.from_pretrained(model_path),
                                    [img for row in mb.prompt_images for img in row])
            lp, _ = response_logprobs(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask,
                                      config=model.config, **vis)
            out.append(lp)
    return torch.cat(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_learner(model: str, zero_stage: int, root: str) -> None:
    from safetensors.torch import load_file

    from actors.learner import Learner, gather_rank_rows
    from calibrl.algo import attach_expert_logprobs
    from calibrl.tiny_models import make_tiny_qwen2, make_tiny_qwen25_vl

    vl = model == "tiny-qwen2.5-vl"
    path = (make_tiny_qwen25_vl if vl else make_tiny_qwen2)(os.path.join(root, model))
    batch = learner_batch(path, vl=vl)
    name = f"learner {model} ZeRO-{zero_stage}"
    t0 = time.perf_counter()
    learner = Learner(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), model_path=path,
                      zero_stage=zero_stage, lr=3e-3, micro_batch_per_device=3)
    cuda = learner.device.type == "cuda"
    report(f"{name}: start", learner.device.type == ("cuda" if torch.cuda.is_available() else "cpu"),
           device=str(learner.device), backend=torch.distributed.get_backend(),
           dtype=str(next(learner.engine.module.parameters()).dtype), pad_multiple=learner.pad_multiple,
           seconds=time.perf_counter() - t0)

    shape = tuple(batch.response_ids.shape)
    logp = gather_rank_rows([learner.compute_logprobs(batch)], "logp", shape)
    ref = reference_logprobs(path, batch, vl)
    mask = batch.response_mask
    gap = float((logp - ref).abs()[mask].mean())
    report(f"{name}: log-probs vs float32", gap < (0.05 if cuda else 1e-4), mean_abs_gap=gap,
           max_abs_gap=float((logp - ref).abs()[mask].max()), tokens=int(mask.sum()))

    attach_expert_logprobs(batch, logp)
    sft = [learner.train_step(batch, loss_name="sft", loss_kwargs={"agg": "token-mean"}) for _ in range(6)]
    losses = [m["loss/total"] for m in sft]
    report(f"{name}: SFT loss falls", losses[-1] < 0.8 * losses[0], first=losses[0], last=losses[-1])
    calib = [learner.train_step(batch, loss_name="calibrl", loss_kwargs={**KNOBS, "agg": "token-mean"})
             for _ in range(4)]
    losses = [m["loss/total"] for m in calib]
    compiled = [m["train/loss_compiled"] for m in calib]
    report(f"{name}: CalibRL loss falls", losses[-1] < losses[0] and all(compiled) == cuda,
           first=losses[0], last=losses[-1], compiled=compiled[0],
           nonfinite=sum(m["train/nonfinite_updates"] for m in calib))

    state = learner.full_state_dict()
    exported = load_file(os.path.join(learner.export_weights(1, os.path.join(root, "export")),
                                      "model.safetensors"))
    same = state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in state)
    report(f"{name}: export equals the gathered weights", same, tensors=len(state),
           path="partitions, no gather" if learner.colocated and zero_stage == 3 else "gathered")
    # what a run logs for this learner (actors/memory.py): the GPU's peak exactly where torch uses one
    from actors.memory import process_memory

    mem = process_memory()
    ok = ("gpu_peak_gb" in mem) == cuda and mem["peak_rss_gb"] >= mem["rss_gb"] > 0.05
    if cuda:
        ok = ok and abs(mem["gpu_peak_gb"] - torch.cuda.max_memory_allocated() / 1e9) < 1e-3
    report(f"{name}: memory as a run logs it", ok, peak_rss_GB=mem["peak_rss_gb"],
           gpu_peak_GB=mem.get("gpu_peak_gb", float("nan")),
           **({"reserved_MiB": torch.cuda.max_memory_reserved() / 2**20} if cuda else {}))


# ---- driver -----------------------------------------------------------------------------------


LEARNERS = [("tiny-qwen2", 2), ("tiny-qwen2", 3), ("tiny-qwen2.5-vl", 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for gpu_check.json (default: a temporary one)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["losses", "time", "learner"])
    parser.add_argument("--learner", nargs=2, metavar=("MODEL", "ZERO_STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the learner picks CUDA where it sees it
    out = args.out or tempfile.mkdtemp(prefix="calibrl-gpu-check-")
    os.makedirs(out, exist_ok=True)

    if args.learner:  # one learner rank, in its own process (one torch.distributed group each)
        model, stage = args.learner
        with tempfile.TemporaryDirectory() as root:
            try:
                check_learner(model, int(stage), root)
            except Exception as err:  # noqa: BLE001 - reported as a failed check; the others still run
                report(f"learner {model} ZeRO-{stage}", False, error=f"{type(err).__name__}: {err}"[:300])
        with open(os.path.join(out, f"learner-{model}-z{stage}.json"), "w") as f:
            json.dump(RESULTS, f)
        return 0

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, results in {out}", flush=True)
    if "losses" not in args.skip:
        check_losses(device)
    if "time" not in args.skip:
        check_loss_time(device)
    if "learner" not in args.skip:
        for model, stage in LEARNERS:
            log = os.path.join(out, f"learner-{model}-z{stage}.log")
            with open(log, "w") as f:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--device", args.device,
                                       "--out", out, "--learner", model, str(stage)],
                                      check=False, stdout=subprocess.PIPE, stderr=f, text=True,
                                      timeout=420)
            print(proc.stdout, end="", flush=True)
            part = os.path.join(out, f"learner-{model}-z{stage}.json")
            if os.path.exists(part):
                with open(part) as f:
                    RESULTS.extend(json.load(f))
                os.remove(part)
            else:
                report(f"learner {model} ZeRO-{stage}", False, exit_code=proc.returncode, log=log)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "results": RESULTS}, f, indent=1)
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"gpu_check: {'FAILED: ' + '; '.join(failed) if failed else 'ok'}: "
          f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
