"""`calibrl plan CONFIG [MORE.yaml] [key=value ...] [--cluster FILE | --cluster ray]`: where each actor
goes and how much memory each GPU needs, before anything starts; refuses a cluster that cannot hold
the run, saying why.

The cluster is a small YAML file, either node by node or in short:

    nodes:                              # or:  nodes: 2
      - {name: a, gpus: 8, gpu_memory_gb: 80, cpus: 96}    #       gpus_per_node: 8
      - {name: b, gpus: 8, gpu_memory_gb: 80, cpus: 96}    #       gpu_memory_gb: 80

or `ray`: the live cluster at `trainer.ray_address` / $RAY_ADDRESS (GPU memory from --gpu-memory-gb).

Placement follows what the actors ask Ray for: each rollout engine one bundle of
`rollout.tensor_parallel_size` GPUs on one node (vLLM's tensor parallelism stays on a node), the
learners `learner.num_learners` bundles of `learner.num_gpus_per_learner` GPUs packed in one
placement group; engines are placed first (largest bundles first), then learners, first fit.

Memory per GPU (bytes; P parameters, N learners, bf16 weights and gradients, fp32 Adam state):
- learner weights 2P (/N under ZeRO-3), gradients 2P (/N under ZeRO-2 and 3), optimizer 12P (fp32
  master, m, v; /N under ZeRO-1..3);
- activations at the longest sequence s = max_prompt_length + max_response_length and micro-batch b:
  34 s h b per layer without checkpointing (Korthikanti et al. 2022, flash attention: no s^2 term),
  with checkpointing 2 s h b per layer kept plus one layer's 34 s h b recomputed;
- the response logits: b (T + 1) V x 10 bytes (bf16 logits, their fp32 copy, its fp32 gradient;
  only the response's T + 1 positions are computed);
- an engine GPU: weights 2P / TP; vLLM's KV cache gets gpu_memory_utilization x memory minus the
  weights and a 10% activation reserve; per token 2 (K, V) x layers x kv_heads x head_dim x 2 bytes.
Worst case: every sequence at its longest. It refuses when a GPU's worst case exceeds its memory,
when the GPUs are too few, or when an engine's weights leave no room for one max_model_len sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from launch.errors import PlanError

GB = 1e9
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
"""Bytes of one transformer layer's stored activations per token per hidden unit in bf16 (flash attention)."""


@dataclass(frozen=True)
class ModelShape:
    params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


KNOWN_MODELS = {
    # published configs (config.json) and parameter counts (safetensors total) of the checkpoints the
    # recipes name, for planning before the weights are on this machine
    "Qwen2.5-VL-7B-Instruct": ModelShape(params=8_292_166_656, hidden=3584, layers=28, heads=28,
                                         kv_heads=4, vocab=152064),
    "Qwen2.5-VL-3B-Instruct": ModelShape(params=3_754_622_976, hidden=2048, layers=36, heads=16,
                                         kv_heads=2, vocab=151936),
}


def model_shape(path: str) -> ModelShape:
    """The shape of the model at `path` from its config.json and weights, or of a known checkpoint of
    that name (KNOWN_MODELS) when the directory is not on this machine."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        name = os.path.basename(os.path.normpath(path))
        if name in KNOWN_MODELS:
            return KNOWN_MODELS[name]
        raise PlanError(f"model.path={path!r}: no config.json there, and {name!r} is not one of the known "
                        f"checkpoints ({', '.join(KNOWN_MODELS)})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    text = cfg.get("text_config") or cfg

    def get(key: str):
        return text.get(key, cfg.get(key))

    return ModelShape(params=_param_count(path), hidden=get("hidden_size"), layers=get("num_hidden_layers"),
                      heads=get("num_attention_heads"),
                      kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
                      vocab=get("vocab_size"))


def _param_count(path: str) -> int:
    """Parameters counted from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    files = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    if not files:
        raise PlanError(f"model.path={path!r}: no *.safetensors to count parameters from")
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


@dataclass
class Node:
    name: str
    gpus: int
    gpu_memory_gb: float
    cpus: float = 0.0


def load_cluster(path: str) -> list[Node]:
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(path))
    nodes = spec.get("nodes")
    if isinstance(nodes, int):
        return [Node(f"node-{i}", int(spec["gpus_per_node"]), float(spec["gpu_memory_gb"]),
                     float(spec.get("cpus_per_node", 0))) for i in range(nodes)]
    if not isinstance(nodes, list) or not nodes:
        raise PlanError(f"{path}: expected `nodes:` as a list of nodes or a count "
                        "(see `calibrl plan --help`)")
    return [Node(str(n.get("name", f"node-{i}")), int(n.get("gpus", 0)), float(n.get("gpu_memory_gb", 0)),
                 float(n.get("cpus", 0))) for i, n in enumerate(nodes)]


def live_cluster(address: str | None, gpu_memory_gb: float) -> list[Node]:
    import ray

    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR")
    try:
        return [Node(n["NodeManagerAddress"], int(n["Resources"].get("GPU", 0)), gpu_memory_gb,
                     float(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()


# ---- memory ---------------------------------------------------------------------------------------------


def learner_memory(cfg, m: ModelShape) -> dict[str, float]:
    """Bytes per learner GPU, by item (see the module docstring)."""
    ln, z = cfg.learner, cfg.learner.zero_stage
    n = ln.num_learners
    b = ln.micro_batch_per_device
    s = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    t = cfg.rollout.max_response_length
    layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * s * m.hidden * b
    return {
        "weights": 2 * m.params / (n if z == 3 else 1),
        "gradients": 2 * m.params / (n if z >= 2 else 1),
        "optimizer": 12 * m.params / (n if z >= 1 else 1),
        "activations, checkpointed": m.layers * 2 * s * m.hidden * b + layer,
        "activations, not checkpointed": m.layers * layer,
        "response logits": b * (t + 1) * m.vocab * 10,
    }


def engine_memory(cfg, m: ModelShape, gpu_bytes: float) -> dict[str, float]:
    r = cfg.rollout
    budget = r.gpu_memory_utilization * gpu_bytes
    weights = 2 * m.params / r.tensor_parallel_size
    kv = budget - weights - 0.1 * budget
    per_token = 2 * m.layers * m.kv_heads * m.head_dim * 2 / r.tensor_parallel_size
    return {"weights": weights, "kv cache": kv, "kv tokens": kv / per_token if kv > 0 else 0.0,
            "budget": budget}


# ---- placement ------------------------------------------------------------------------------------------


def place(cfg, nodes: list[Node]) -> dict[str, list[str]]:
    """node name -> actors, first fit: engines (one node each), then learners."""
    r, ln = cfg.rollout, cfg.learner
    free = {n.name: float(n.gpus) for n in nodes}
    where: dict[str, list[str]] = {n.name: [] for n in nodes}
    engine_gpus = r.num_gpus_per_worker or r.tensor_parallel_size
    wanted = ([(f"rollout-{i}", engine_gpus) for i in range(r.num_workers)]
              + [(f"learner-{i}", ln.num_gpus_per_learner) for i in range(ln.num_learners)])
    total = sum(g for _, g in wanted)
    have = sum(n.gpus for n in nodes)
    if total > have:
        raise PlanError(f"the run needs {total:g} GPUs ({r.num_workers} rollout engine(s) x {engine_gpus:g} "
                        f"+ {ln.num_learners} learner(s) x {ln.num_gpus_per_learner:g}); the cluster has "
                        f"{have}")
    for actor, gpus in wanted:
        node = next((name for name, f in free.items() if f >= gpus - 1e-9), None)
        if node is None:
            biggest = max(n.gpus for n in nodes)
            raise PlanError(f"{actor} needs {gpus:g} GPUs on one node; no node has that many free (the "
                            f"largest has {biggest}); lower rollout.tensor_parallel_size or use larger nodes")
        free[node] -= gpus
        where[node].append(f"{actor} ({gpus:g} GPU)")
    return where


# ---- the plan -------------------------------------------------------------------------------------------


def plan(cfg, nodes: list[Node], m: ModelShape) -> tuple[list[str], list[str]]:
    """(report lines, problems); problems empty when the run fits."""
    where = place(cfg, nodes)
    gpu_gb = min(n.gpu_memory_gb for n in nodes if n.gpus) if any(n.gpus for n in nodes) else 0.0
    lm = learner_memory(cfg, m)
    static = lm["weights"] + lm["gradients"] + lm["optimizer"]
    ckpt = cfg.model.gradient_checkpointing
    act = lm["activations, checkpointed" if ckpt else "activations, not checkpointed"]
    learner_total = static + act + lm["response logits"]
    em = engine_memory(cfg, m, gpu_gb * GB)
    lines = [(f"model: {m.params / 1e9:.2f}B parameters, {m.layers} layers, hidden {m.hidden}, "
              f"{m.heads} heads ({m.kv_heads} KV), vocabulary {m.vocab}"), "",
             "| node | GPUs | actors |", "|---|---|---|"]
    for node in nodes:
        actors = ", ".join(where[node.name]) or "-"
        lines.append(f"| {node.name} | {node.gpus} x {node.gpu_memory_gb:g} GB | {actors} |")
    longest = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    lines += ["", (f"Per learner GPU (ZeRO-{cfg.learner.zero_stage}, {cfg.learner.num_learners} learners, "
                   f"micro-batch {cfg.learner.micro_batch_per_device}, longest sequence {longest} tokens), "
                   "GB:"),
              "| item | GB |", "|---|---|"]
    lines += [f"| {k} | {v / GB:.2f} |" for k, v in lm.items()]
    on = "on" if ckpt else "off"
    lines.append(f"| **total** (checkpointing {on}) | **{learner_total / GB:.2f}** of {gpu_gb:g} |")
    lines += ["", (f"Per rollout-engine GPU (tensor parallel {cfg.rollout.tensor_parallel_size}, "
                   f"gpu_memory_utilization {cfg.rollout.gpu_memory_utilization}), GB:"),
              "| item | GB |", "|---|---|",
              f"| weights | {em['weights'] / GB:.2f} |", f"| KV cache | {em['kv cache'] / GB:.2f} |",
              (f"| KV capacity | {em['kv tokens']:,.0f} tokens = "
               f"{em['kv tokens'] / cfg.model.max_model_len:.1f} sequences of "
               f"model.max_model_len={cfg.model.max_model_len} |")]
    problems = []
    if learner_total > gpu_gb * GB:
        other = lm["activations, not checkpointed" if ckpt else "activations, checkpointed"]
        hint = ("" if ckpt or static + other + lm["response logits"] > gpu_gb * GB
                else "; model.gradient_checkpointing=true would fit")
        problems.append(f"a learner GPU needs {learner_total / GB:.1f} GB at the longest sequence, more than "
                        f"its {gpu_gb:g} GB (weights, gradients and optimizer {static / GB:.1f} GB under "
                        f"ZeRO-{cfg.learner.zero_stage} over {cfg.learner.num_learners} learners){hint}")
    if em["kv tokens"] < cfg.model.max_model_len:
        problems.append(f"a rollout engine's KV cache holds {em['kv tokens']:,.0f} tokens, less than one "
                        f"sequence of model.max_model_len={cfg.model.max_model_len} (weights "
                        f"{em['weights'] / GB:.1f} GB of a {em['budget'] / GB:.1f} GB budget per GPU)")
    return lines, problems


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="calibrl plan", description=__doc__.splitlines()[0])
    ap.add_argument("args", nargs="*", help="CONFIG.yaml files and key=value overrides")
    ap.add_argument("--cluster", default=None, help="a cluster YAML, or `ray` for the live cluster")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory with --cluster ray")
    args = ap.parse_args(argv)

    from calibrl.config import load_config, split_config_args, validate

    configs, overrides = split_config_args(args.args)
    cfg = validate(load_config(configs, overrides))
    if args.cluster == "ray":
        nodes = live_cluster(cfg.trainer.ray_address, args.gpu_memory_gb)
    elif args.cluster:
        nodes = load_cluster(args.cluster)
    else:
        raise PlanError("give the cluster: --cluster FILE (nodes, GPUs per node, GPU memory) or "
                        "--cluster ray")
    lines, problems = plan(cfg, nodes, model_shape(cfg.model.path))
    print("\n".join(lines))
    if problems:
        raise PlanError("the cluster cannot hold this run:\n  - " + "\n  - ".join(problems))
    print("\nplan: fits")


if __name__ == "__main__":
    main(sys.argv[1:])
