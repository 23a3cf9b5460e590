"""Benchmark: learner -> rollout weight sync against its floor, and rollout throughput inside the
Ray actor against vLLM used directly.

    .venv/bin/python benchmarks/weight_sync.py           # tiny Qwen2 + a random ~200M Qwen2, 5 repetitions
    .venv/bin/python benchmarks/weight_sync.py --quick   # tiny Qwen2 + a random ~100M Qwen2, 3 repetitions

1. Weight sync, end to end: `ShmWeightSync(learners, [worker]).push(v)` timed in the driver (gather
   from the learner ranks, safetensors under /dev/shm, vLLM `reload_weights` in every rollout
   worker, prefix-cache reset, the Ray round trips), median of --repeats (x3 for the tiny model).
   The floor, measured in the same run on the same weights, alternating with the pushes:
   `safetensors.save_file` of the learner's full state dict to /dev/shm (in this process) plus the
   workers' `load_weights_from_path` of a directory written beforehand (vLLM's own
   `reload_weights`, timed inside the worker). Target: push <= 1.5x floor. Learner layouts: 1 rank
   ZeRO-2 (no gather) and 2 ranks ZeRO-3 (on one node each rank writes its partitions into the
   one file).
2. Rollout throughput: generated tokens/s of `RolloutWorker.generate` called through its Ray actor
   (timed in the driver: Ray, result conversion and all) against `vllm.LLM.generate` in a
   subprocess of its own (vLLM pins the threads of the process that holds the engine) with the
   same engine arguments, prompts, seed and sampling (token counts may differ a little: another
   thread count sums floats in another order). The engines take turns, one generate each per
   round, so a drifting machine load hits all alike; median of --repeats rounds (x3 for the tiny
   model) after a warm-up round; both time from the prompt texts (chat rendering included). The
   actor runs with num_cpus = all cores (Ray sets OMP_NUM_THREADS to it, so the engine has the
   direct one's threads; target >= 0.9x) and, for reference, with num_cpus=1.

Models are built locally with random weights (nothing is downloaded); every /dev/shm directory the
run writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENGINE = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_mib": 128, "seed": 0,
          "weight_sync": "gloo"}
"""RolloutWorker keywords; the direct run passes vLLM the same values (see direct_engine)."""


def make_random_qwen2(out_dir: str, *, hidden_size: int, num_layers: int, intermediate_size: int,
                      vocab_size: int = 32768, seed: int = 0) -> int:
    """A random Qwen2ForCausalLM in calibrl.tiny_models' style (its byte-level tokenizer, head_dim 64,
    untied lm_head), vocabulary padded to `vocab_size`; returns the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from calibrl.tiny_models import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64,
                      num_key_value_heads=4,
                      max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                      rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


# ---- weight sync --------------------------------------------------------------------------------


def sync_latency(model_path: str, worker, *, ranks: int, zero_stage: int, repeats: int,
                 shm_root: str) -> dict:
    """Median seconds of ShmWeightSync.push, of TransferWeightSync.push over gloo (vLLM's weight-transfer
    API) and of the shm floor (write + reload), taking turns."""
    import ray
    from safetensors.torch import load_file, save_file

    from actors.group import ActorGroup
    from actors.learner import Learner
    from actors.weight_files import link_model_files
    from actors.weight_sync import ShmWeightSync, TransferWeightSync

    learners = ActorGroup(Learner, ranks, name_prefix=f"learner-bench-z{zero_stage}x{ranks}",
                          num_cpus_per_actor=1, model_path=model_path, zero_stage=zero_stage)
    sync = ShmWeightSync(learners, [worker], root=os.path.join(shm_root, f"push-z{zero_stage}x{ranks}"))
    transfer = TransferWeightSync(learners, [worker], backend="gloo")
    try:
        sync.push(1)  # warm-up; its file holds the bytes the floor writes (read back, not sent through Ray)
        state = load_file(os.path.join(sync.root, "v1", "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        transfer.push(1)  # warm-up
        push, export, load, write, reload, gloo = [], [], [], [], [], []
        for i in range(repeats + 1):  # the first round warms up the floor
            t0 = time.perf_counter()
            timings = sync.push(i + 2)
            t_push = time.perf_counter() - t0
            t0 = time.perf_counter()
            transfer.push(i + 2)
            t_gloo = time.perf_counter() - t0

            floor_dir = os.path.join(shm_root, f"floor-{i}")
            os.makedirs(floor_dir)
            t0 = time.perf_counter()
            save_file(state, os.path.join(floor_dir, "model.safetensors"))
            t_write = time.perf_counter() - t0
            link_model_files(model_path, floor_dir)
            t_reload = max(ray.get([worker.load_weights_from_path.remote(-1, floor_dir)]))
            shutil.rmtree(floor_dir)
            if i:
                push.append(t_push)
                export.append(timings["time/sync_export_s"])
                load.append(timings["time/sync_load_s"])
                write.append(t_write)
                reload.append(t_reload)
                gloo.append(t_gloo)
        med = statistics.median
        return {"bytes": nbytes, "push": med(push), "export": med(export), "load": med(load),
                "write": med(write), "reload": med(reload), "gloo": med(gloo),
                "floor": med(w + r for w, r in zip(write, reload))}
    finally:
        sync.close()
        learners.shutdown()


# ---- rollout throughput -----------------------------------------------------------------------------


def rollout_prompts(num_prompts: int) -> list[str]:
    from calibrl.data.synthetic import generate_examples

    return [e.prompt for e in generate_examples(num_prompts, seed=0, split="test", multimodal=False)]


def engine_threads(_=None) -> int:
    import torch

    return torch.get_num_threads()


def requests_for(prompts: list[str]):
    from actors.rollout import RolloutRequest

    return [RolloutRequest(prompt_id=str(i), prompt=p, seed=i) for i, p in enumerate(prompts)]


def actor_generate(worker, requests, sampling: dict) -> dict:
    """One timed `generate` through the actor: {'tokens', 'seconds'}."""
    import ray

    from actors.rollout import SamplingSpec

    t0 = time.perf_counter()
    results = ray.get(worker.generate.remote(requests, SamplingSpec(**sampling)))
    return {"tokens": sum(len(s.token_ids) for r in results for s in r.samples),
            "seconds": time.perf_counter() - t0}


def direct_engine(spec_file: str) -> None:
    """(Subprocess) vLLM's LLM in this process with RolloutWorker's engine arguments and request
    building; one timed generate per line on stdin, one `RESULT {json}` line on stdout each."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as in the actor
    import torch
    from vllm import LLM, SamplingParams

    from calibrl.inputs import render_chat

    with open(spec_file) as f:
        spec = json.load(f)
    e = spec["engine"]
    llm = LLM(model=spec["model_path"], dtype=e["dtype"], max_model_len=e["max_model_len"], seed=e["seed"],
              tensor_parallel_size=1, enable_prefix_caching=True, use_tqdm_on_load=False,
              kv_cache_memory_bytes=e["kv_cache_memory_mib"] * 1024**2, enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    s = spec["sampling"]
    print("RESULT " + json.dumps({"threads": engine_threads()}), flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()  # from the prompt texts, as the worker's generate
        prompts = [{"prompt": render_chat(tokenizer, p)} for p in spec["prompts"]]
        # as RolloutWorker.generate on CPU: no per-request seeds, the engine's generator seeded per call
        params = [SamplingParams(n=s["n"], temperature=s["temperature"], top_p=1.0,
                                 max_tokens=s["max_tokens"], logprobs=0) for _ in prompts]
        torch.manual_seed(0)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds}), flush=True)


class DirectEngine:
    """Drives `direct_engine` in a subprocess (vLLM pins the threads of the process that holds it)."""

    def __init__(self, model_path: str, prompts: list[str], sampling: dict, tmp: str):
        spec_file = os.path.join(tmp, "direct.json")
        with open(spec_file, "w") as f:
            json.dump({"model_path": model_path, "engine": ENGINE, "prompts": prompts,
                       "sampling": sampling}, f)
        self.log = os.path.join(tmp, "direct.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--direct", spec_file],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True)

    def result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT "))
        with open(self.log) as f:
            raise RuntimeError(f"direct vLLM engine exited ({self.proc.wait()}):\n{f.read()[-3000:]}")

    def generate(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.result()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def rollout_throughput(model_path: str, prompts: list[str], sampling: dict, repeats: int, tmp: str,
                       cpu_options: tuple[int, ...]) -> tuple[list[tuple[str, dict]], object]:
    """vLLM direct and the actor with each num_cpus in `cpu_options`, one generate each in turn
    (the load of the machine drifts alike for all), median of `repeats` after a warm-up round.
    Returns the rows and the actor with the most CPUs (kept alive for the weight-sync runs)."""
    import ray

    from actors.group import named_actor
    from actors.rollout import RolloutWorker

    direct = DirectEngine(model_path, prompts, sampling, tmp)
    name = os.path.basename(model_path)
    workers = {c: named_actor(RolloutWorker, f"rollout-bench-{name}-{c}", num_cpus=c, model_path=model_path,
                              **ENGINE) for c in cpu_options}
    try:
        threads = {"direct": direct.result()["threads"]}
        threads |= {c: ray.get(w.__ray_call__.remote(engine_threads)) for c, w in workers.items()}
        requests = requests_for(prompts)
        runs = {k: [] for k in threads}
        for i in range(repeats + 1):
            for k, done in runs.items():
                r = direct.generate() if k == "direct" else actor_generate(workers[k], requests, sampling)
                if i:
                    done.append(r)
    finally:
        direct.close()
        for c, w in workers.items():
            if c != max(cpu_options):
                ray.kill(w)
    rows = []
    for k, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        engine = "vLLM LLM, one process" if k == "direct" else f"Ray actor, num_cpus={k}"
        rows.append((engine, {"threads": threads[k], "tokens": rs[-1]["tokens"], "seconds": seconds,
                              "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rs)}))
    return rows, workers[max(cpu_options)]


# ---- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~100M model, fewer prompts and repetitions")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median counts)")
    parser.add_argument("--sync-only", action="store_true", help="the weight-sync table only")
    parser.add_argument("--direct", metavar="SPEC_JSON", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.direct:
        direct_engine(args.direct)
        return

    repeats = args.repeats or (3 if args.quick else 5)
    big = ({"hidden_size": 768, "num_layers": 8, "intermediate_size": 2048} if args.quick
           else {"hidden_size": 1024, "num_layers": 12, "intermediate_size": 2816})
    num_prompts = 8 if args.quick else 16
    sampling = {"n": 4, "temperature": 1.0, "max_tokens": 16 if args.quick else 32}

    import ray

    from actors.group import named_actor
    from actors.rollout import RolloutWorker
    from calibrl.tiny_models import make_tiny_qwen2

    tmp = tempfile.mkdtemp(prefix="calibrl-bench-")
    shm_root = tempfile.mkdtemp(prefix="calibrl-bench-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    sync_rows, rollout_rows = [], []
    try:
        name = f"random-qwen2-{big['num_layers']}x{big['hidden_size']}"
        models = {"tiny-qwen2": make_tiny_qwen2(os.path.join(tmp, "tiny-qwen2")),
                  name: os.path.join(tmp, name)}
        num_params = make_random_qwen2(models[name], **big)
        prompts = rollout_prompts(num_prompts)
        print(f"{num_prompts} prompts x n={sampling['n']} x {sampling['max_tokens']} tokens; "
              f"{repeats} repetitions; {name}: {num_params / 1e6:.0f}M parameters", flush=True)

        cores = os.cpu_count() or 1
        ray.init(num_cpus=2 * cores + 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
        for m, path in models.items():
            # Ray sets OMP_NUM_THREADS to an actor's num_cpus: the engine's threads follow its reservation
            # the tiny model's rounds take a fraction of a second, and its pushes' fixed costs (the
            # engine's reload step: 19-57 ms across runs) jitter on the scale of the push itself
            rounds = repeats * (3 if m == "tiny-qwen2" else 1)
            if args.sync_only:
                worker = named_actor(RolloutWorker, f"rollout-bench-{m}", num_cpus=cores, model_path=path,
                                     **ENGINE)
            else:
                rows, worker = rollout_throughput(path, prompts, sampling, rounds, tmp,
                                                  cpu_options=(cores, 1))
                rollout_rows += [(m, engine, r) for engine, r in rows]
            try:
                for ranks, stage in ((1, 2), (2, 3)):
                    r = sync_latency(path, worker, ranks=ranks, zero_stage=stage, repeats=rounds,
                                     shm_root=shm_root)
                    sync_rows.append((m, f"{ranks} rank{'s' if ranks > 1 else ''}, ZeRO-{stage}", r))
                    print(f"  {m} {ranks}x ZeRO-{stage}: shm push {r['push']:.3f}s, gloo transfer "
                          f"{r['gloo']:.3f}s, floor {r['floor']:.3f}s", flush=True)
            finally:
                ray.kill(worker)
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if ray.is_initialized():
            ray.shutdown()

    print()
    print("Weight sync, median seconds. shm = ShmWeightSync.push end to end (export = gather + write, load =")
    print("the engines' reload); gloo = TransferWeightSync.push (vLLM's weight-transfer API, gloo engine);")
    print("floor = safetensors write + vLLM reload_weights of the same bytes")
    print(f"| {'model':26s} | {'learners':16s} | {'MB':>6s} | {'shm':>6s} | {'export':>6s} | {'load':>6s} | "
          f"{'gloo':>6s} | {'floor':>6s} | shm/floor | gloo/floor | gloo/shm |")
    print(f"|{'-' * 28}|{'-' * 18}|{'-' * 8}|" + f"{'-' * 8}|" * 5 + "-----------|------------|----------|")
    for m, layout, r in sync_rows:
        print(f"| {m:26s} | {layout:16s} | {r['bytes'] / 1e6:6.0f} | {r['push']:6.3f} | {r['export']:6.3f} | "
              f"{r['load']:6.3f} | {r['gloo']:6.3f} | {r['floor']:6.3f} | {r['push'] / r['floor']:8.2f}x | "
              f"{r['gloo'] / r['floor']:9.2f}x | {r['gloo'] / r['push']:7.2f}x |")
    if not rollout_rows:
        return
    print()
    print("Rollout throughput, generated tokens/s (median); ratio against vLLM direct")
    print(f"| {'model':26s} | {'engine':26s} | threads | {'tokens':>6s} | {'tokens/s':>8s} | "
          f"{'ratio':>6s} | target  |")
    print(f"|{'-' * 28}|{'-' * 28}|---------|{'-' * 8}|{'-' * 10}|{'-' * 8}|---------|")
    direct = {m: r["tokens_per_s"] for m, engine, r in rollout_rows if engine.startswith("vLLM")}
    for m, engine, r in rollout_rows:
        ratio, target = (("", "") if engine.startswith("vLLM")
                         else (f"{r['tokens_per_s'] / direct[m]:5.2f}x", ">= 0.9x"))
        print(f"| {m:26s} | {engine:26s} | {r['threads']:7d} | {r['tokens']:6d} | {r['tokens_per_s']:8.0f} | "
              f"{ratio:>6s} | {target:7s} |")


if __name__ == "__main__":
    main()
