"""`calibrl plan`: placement and memory per GPU against hand-worked numbers for the 7B and 3B recipes;
it refuses a cluster too small for the 7B recipe and says why; every file in configs/ loads,
validates and is accepted by the planner."""

import glob
import os

import pytest

from calibrl.config import load_config, validate
from launch.cli import main
from launch.errors import PlanError
from launch.plan import GB, KNOWN_MODELS, Node, model_shape, plan

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE_7B = os.path.join(ROOT, "configs", "qwen25vl_7b_calibrl.yaml")
RECIPE_3B = os.path.join(ROOT, "configs", "qwen25vl_3b_calibrl.yaml")
EIGHT_H100 = [Node("node-0", 8, 80.0)]


def numbers(lines: list[str]) -> dict[str, float]:
    """The GB column of the plan's memory tables, by row label (the learner table first)."""
    out = {}
    for line in lines:
        cells = [c.replace("*", "").strip() for c in line.strip("|").split("|")]
        if len(cells) == 2:
            try:
                out.setdefault(cells[0], float(cells[1].split()[0]))
            except ValueError:
                pass
    return out


def test_7b_recipe_on_one_8_gpu_node_by_hand():
    cfg = validate(load_config(RECIPE_7B))
    lines, problems = plan(cfg, EIGHT_H100, KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"])
    assert problems == []
    got = numbers(lines)
    p = 8_292_166_656  # parameters; 4 ZeRO-3 learners; micro-batch 2; s = 20480 + 4096; T = 4096
    assert got["weights"] == pytest.approx(2 * p / 4 / GB, abs=0.01)          # 4.15 GB bf16, a quarter
    assert got["gradients"] == pytest.approx(4.15, abs=0.01)
    assert got["optimizer"] == pytest.approx(12 * p / 4 / GB, abs=0.01)       # 24.88: fp32 master, m, v
    # checkpointed: 28 layers x 2 x 24576 x 3584 x 2 (kept inputs) + 34 x 24576 x 3584 x 2 (one layer)
    assert got["activations, checkpointed"] == pytest.approx((28 * 2 + 34) * 24576 * 3584 * 2 / GB, abs=0.01)
    assert got["response logits"] == pytest.approx(2 * 4097 * 152064 * 10 / GB, abs=0.01)   # 12.46
    total = got["total (checkpointing on)"]
    assert total == pytest.approx(4.15 + 4.15 + 24.88 + 15.85 + 12.46, abs=0.02)  # 61.48 of 80
    # engines: TP 2, 0.85 x 80 = 68 GB budget; weights 2P / 2; KV = 68 - 8.29 - 6.8
    assert [line for line in lines if line.startswith("| weights")][1] == "| weights | 8.29 |"
    assert "| KV cache | 52.91 |" in lines
    kv_per_token_per_gpu = 2 * 28 * 4 * 128 * 2 / 2  # K and V, layers, KV heads, head dim, bf16; split by TP
    assert f"{52.91e9 / kv_per_token_per_gpu:,.0f}"[:5] in " ".join(lines)  # 1,845,xxx tokens
    assert "rollout-0 (2 GPU), rollout-1 (2 GPU), learner-0 (1 GPU)" in " ".join(lines)


def test_3b_recipe_by_hand():
    cfg = validate(load_config(RECIPE_3B))
    lines, problems = plan(cfg, EIGHT_H100, KNOWN_MODELS["Qwen2.5-VL-3B-Instruct"])
    assert problems == []
    got = numbers(lines)
    p = 3_754_622_976
    assert got["weights"] == pytest.approx(2 * p / 4 / GB, abs=0.01)          # 1.88
    assert got["optimizer"] == pytest.approx(12 * p / 4 / GB, abs=0.01)       # 11.26
    assert got["activations, checkpointed"] == pytest.approx((36 * 2 + 34) * 24576 * 2048 * 2 / GB, abs=0.01)
    assert got["response logits"] == pytest.approx(2 * 4097 * 151936 * 10 / GB, abs=0.01)   # 12.45
    total = got["total (checkpointing on)"]
    assert total == pytest.approx(1.88 * 2 + 11.26 + 10.67 + 12.45, abs=0.03)    # 38.14
    assert "| KV cache | 53.69 |" in lines  # 68 - 7.51 (all weights, TP 1) - 6.8
    assert "rollout-3 (1 GPU)" in " ".join(lines)


def test_refuses_two_80gb_gpus_for_the_7b_recipe(tmp_path, capsys):
    cluster = tmp_path / "two.yaml"
    cluster.write_text("nodes:\n  - {name: box, gpus: 2, gpu_memory_gb: 80}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", RECIPE_7B, "--cluster", str(cluster)])
    assert e.value.code == 2
    assert ("the run needs 8 GPUs (2 rollout engine(s) x 2 + 4 learner(s) x 1); the cluster has 2"
            in capsys.readouterr().err)


def test_refuses_gpus_too_small_and_says_what_does_not_fit():
    cfg = validate(load_config(RECIPE_7B))
    _, problems = plan(cfg, [Node("small", 8, 24.0)], KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"])
    assert any("a learner GPU needs 61.5 GB at the longest sequence, more than its 24 GB" in p
               for p in problems)
    assert any("KV cache holds" in p for p in problems) is False  # 0.85 x 24 - 4.1 - 2.0 still holds one
    no_ckpt = validate(load_config(RECIPE_7B, ["model.gradient_checkpointing=false"]))
    _, problems = plan(no_ckpt, EIGHT_H100, KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"])
    assert problems and "model.gradient_checkpointing=true would fit" in problems[0]


def test_an_engine_node_too_small_for_tensor_parallelism():
    cfg = validate(load_config(RECIPE_7B))
    with pytest.raises(PlanError, match="rollout-0 needs 2 GPUs on one node"):
        plan(cfg, [Node(f"n{i}", 1, 80.0) for i in range(8)], KNOWN_MODELS["Qwen2.5-VL-7B-Instruct"])


def test_model_shape_from_a_local_checkpoint(tiny_models):
    m = model_shape(tiny_models["tiny-qwen2.5-vl"])
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["tiny-qwen2.5-vl"])
    assert m.params == sum(p.numel() for p in model.state_dict().values())
    text = model.config.text_config
    assert (m.hidden, m.layers) == (text.hidden_size, text.num_hidden_layers)


RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
OVERLAYS = sorted(glob.glob(os.path.join(ROOT, "configs", "qwen25vl_7b", "*.yaml")))


@pytest.mark.parametrize("files", [[r] for r in RECIPES] + [[RECIPE_7B, o] for o in OVERLAYS],
                         ids=lambda f: "+".join(os.path.basename(x) for x in f))
def test_every_config_loads_validates_and_plans(files, tiny_models, tmp_path):
    cfg = validate(load_config(files))
    shape = (model_shape(tiny_models["tiny-qwen2.5-vl"]) if "cpu" in os.path.basename(files[0])
             else KNOWN_MODELS[os.path.basename(cfg.model.path)])
    nodes = [Node(f"node-{i}", 8, 80.0) for i in range(2 if "two_nodes" in files[-1] else 1)]
    _, problems = plan(cfg, nodes, shape)
    assert problems == []
