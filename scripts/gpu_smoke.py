"""GPU smoke run: the production path on 1-8 local GPUs with the tiny vision-language model.

    bash scripts/gpu_smoke.sh [--steps 3] [--out runs/gpu-smoke]

Builds the tiny Qwen2.5-VL model and a synthetic dataset locally (nothing is downloaded), then
trains CalibRL for a few steps with the 7B recipe's layout scaled to the GPUs present:
- 2+ GPUs: half the GPUs run ZeRO-3 learners (bf16), the rest vLLM engines, and weights move
  through vLLM's NCCL weight-transfer engine (`rollout.weight_sync=nccl`);
- 1 GPU: one learner and one engine share it (0.5 GPU each in Ray); NCCL cannot put two ranks on
  one device, so weights move through /dev/shm (`shm`).
Prints, per step, the weight-sync time and the rollout-vs-learner log-prob gap (mean |log pi_vLLM -
log pi_learner| over sampled tokens), and exits 1 if a step failed or the gap exceeds --max-gap.
Exit 2: no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--max-gap", type=float, default=0.05,
                        help="largest acceptable mean log-prob gap (bf16 on both sides)")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("gpu_smoke: no CUDA device visible", file=sys.stderr)
        return 2
    gpus = min(gpus, 8)
    from calibrl.config import load_config
    from calibrl.data.synthetic import write_splits
    from calibrl.tiny_models import make_all
    from launch.metrics import read_metrics
    from launch.train import train

    root = tempfile.mkdtemp(prefix="calibrl-gpu-smoke-")
    model = make_all(os.path.join(root, "models"))["tiny-qwen2.5-vl"]
    data = write_splits(os.path.join(root, "data"), n_train=64, n_val=16, n_test=8, seed=0, multimodal=True)
    out = args.out or os.path.join(root, "run")
    learners = max(1, gpus // 2)
    engines = max(1, gpus - learners)
    layout = ([f"learner.num_learners={learners}", f"rollout.num_workers={engines}",
               "rollout.weight_sync=nccl"] if gpus >= 2 else
              ["learner.num_learners=1", "rollout.num_workers=1", "rollout.weight_sync=shm",
               "learner.num_gpus_per_learner=0.5", "rollout.num_gpus_per_worker=0.5"])
    recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                          "qwen25vl_7b_calibrl.yaml")
    cfg = load_config(recipe, [
        f"model.path={model}", "model.max_model_len=1024", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['val']}]", "data.max_prompt_length=512", "rollout.tensor_parallel_size=1",
        "rollout.samples_per_prompt=4", "rollout.max_response_length=32",
        "rollout.gpu_memory_utilization=0.3",
        "rollout.stream_chunk_prompts=2", "verifier.num_workers=2", "learner.mini_batch_prompts=4",
        "learner.lr=1e-4", "trainer.prompts_per_step=8", f"trainer.total_steps={args.steps}",
        "trainer.eval_max_prompts=8", "trainer.eval_pass_k=1", f"trainer.output_dir={out}", *layout])
    print(f"gpu_smoke: {gpus} GPU(s) ({torch.cuda.get_device_name(0)}): {learners} learner(s), "
          f"{engines} engine(s), weight sync {cfg.rollout.weight_sync}; run in {out}", flush=True)
    t0 = time.time()
    train(cfg)
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    print("\n| step | sync s | rollout-vs-learner log-prob gap | step s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r.get('time/sync_s', float('nan')):.3f} | "
              f"{r['policy/rollout_vs_learner_logp_gap']:.4f} | {r['time/step_s']:.2f} |")
    worst = max((r["policy/rollout_vs_learner_logp_gap"] for r in rows), default=float("inf"))
    ok = len(rows) == args.steps and worst <= args.max_gap
    print(f"gpu_smoke: {'ok' if ok else 'FAILED'}: {len(rows)}/{args.steps} steps, largest gap {worst:.4f} "
          f"(limit {args.max_gap}), {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
