"""The expert-trajectory store: experts read lazily from the dataset's expert columns (calibrl and
reference files), `first` / `random` choice, tokenisation, a bounded cache, validated additions that
persist to parquet and survive killing the actor."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from transformers import AutoTokenizer

from actors.expert_store import ADDITIONS_FILE, ExpertStore
from calibrl.config import Config
from calibrl.data import DataError, Example, load_examples, write_examples

EXPERTS = {  # prompt id -> expert trajectories in the file
    "ex-0": ["<think>a</think><answer>0</answer>"],
    "ex-1": ["<think>one</think><answer>1</answer>", "<think>uno</think><answer>1</answer>",
             "<think>eins</think><answer>1</answer>"],
    "ex-2": [],
    "ex-3": ["<think>three</think><answer>3</answer>", "<think>drei</think><answer>3</answer>"],
    "ex-4": ["<think>four</think><answer>4</answer>"],
}
REFERENCE_EXPERTS = {10: "<think>ten</think><answer>10</answer>",
                     11: "<think>eleven</think><answer>11</answer>"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """A calibrl file in row groups of 2 rows and a reference-format file (string `solution` column)."""
    root = tmp_path_factory.mktemp("experts")
    examples = [Example(id=pid, prompt=f"question {pid}", images=(), answer=pid[-1], experts=tuple(experts),
                        data_source="toy") for pid, experts in EXPERTS.items()]
    calibrl_path = write_examples(root / "train.parquet", examples, row_group_rows=2)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    reference = pa.table({
        "prompt": pa.array([[{"role": "user", "content": f"q{i}"}] for i in REFERENCE_EXPERTS],
                           pa.list_(message)),
        "reward_model": pa.array([{"ground_truth": str(i)} for i in REFERENCE_EXPERTS],
                                 pa.struct([("ground_truth", pa.string())])),
        "extra_info": pa.array([{"index": i} for i in REFERENCE_EXPERTS], pa.struct([("index", pa.int64())])),
        "solution": list(REFERENCE_EXPERTS.values()),
    })
    reference_path = str(root / "ref.parquet")
    pq.write_table(reference, reference_path)
    return [calibrl_path, reference_path]


def expected_ids(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def test_first_choice_ids_and_tokenisation(dataset, tiny_models, tmp_path):
    path = tiny_models["tiny-qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    store = ExpertStore(files=dataset, tokenizer_path=path, additions_dir=str(tmp_path), choice="first")
    assert "indexed_prompts" not in store.state()  # nothing is read before the first get
    examples, _ = load_examples(dataset)  # the reader's ids are the store's keys
    got = store.get([e.id for e in examples], k=2)
    assert set(got) == {e.id for e in examples} == set(EXPERTS) | {"ref:10", "ref:11"}
    for e in examples:
        assert [r.text for r in got[e.id]] == list(e.experts[:2])
        for r in got[e.id]:
            assert r.source == "dataset" and r.token_ids.tolist() == expected_ids(tokenizer, r.text)
            assert r.token_ids.dtype == np.int64 and not r.token_ids.flags.writeable  # shared with the cache
    assert got["ex-2"] == []
    assert got["ref:11"][0].text == REFERENCE_EXPERTS[11]
    assert [r.text for r in store.get(["ex-1"], k=1)["ex-1"]] == EXPERTS["ex-1"][:1]
    assert [r.text for r in store.get(["ex-1"], k=5)["ex-1"]] == EXPERTS["ex-1"]  # fewer than k: all
    assert store.get(["no-such-prompt"], k=1) == {"no-such-prompt": []}
    state = store.state()
    assert state["indexed_prompts"] == 7 and state["unknown_prompt_ids"] == 1
    assert state["prompts_without_expert"] == 2  # ex-2 and the unknown id


def test_random_choice_is_seeded_and_varies(dataset, tiny_models, tmp_path):
    def draws(seed):
        store = ExpertStore(files=dataset, tokenizer_path=tiny_models["tiny-qwen2"],
                            additions_dir=str(tmp_path), choice="random", seed=seed)
        return [tuple(r.text for r in store.get(["ex-1", "ex-0"], k=2)["ex-1"]) for _ in range(20)]

    first = draws(0)
    assert first == draws(0)  # same seed, same draws
    assert first != draws(1)
    for pair in first:
        assert len(set(pair)) == 2 and set(pair) <= set(EXPERTS["ex-1"])
    assert len(set(first)) > 1  # not always the same two

    # a checkpointed generator state replays the same draws (resume is exact for `random`)
    store = ExpertStore(files=dataset, tokenizer_path=tiny_models["tiny-qwen2"], additions_dir=str(tmp_path),
                        choice="random", seed=5)
    store.get(["ex-1"], k=2)
    saved = store.rng_state()
    later = [tuple(r.text for r in store.get(["ex-1"], k=2)["ex-1"]) for _ in range(10)]
    store.set_rng_state(saved)
    assert [tuple(r.text for r in store.get(["ex-1"], k=2)["ex-1"]) for _ in range(10)] == later


def test_cache_is_bounded(dataset, tiny_models, tmp_path):
    store = ExpertStore(files=dataset, tokenizer_path=tiny_models["tiny-qwen2"], additions_dir=str(tmp_path),
                        max_cached=2)
    store.get(["ex-0", "ex-1"], k=1)  # one row group
    assert store.state()["row_groups_read"] == 1
    store.get(["ex-4"], k=1)  # evicts ex-0, the least recently used
    store.get(["ex-1"], k=1)  # still cached
    state = store.state()
    assert state["cached_prompts"] == 2 and state["cache_hits"] == 1 and state["row_groups_read"] == 2
    assert [r.text for r in store.get(["ex-0"], k=1)["ex-0"]] == EXPERTS["ex-0"]  # read again
    assert store.state()["row_groups_read"] == 3


def test_bad_expert_row_names_file_row_and_field(tiny_models, tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "p"], "answer": ["1", "2"],
                             "experts": pa.array([["<answer>1</answer>"], ["  "]], pa.list_(pa.string()))}),
                   path)
    store = ExpertStore(files=[path], tokenizer_path=tiny_models["tiny-qwen2"], additions_dir=str(tmp_path))
    assert store.get(["a"], k=1)["a"][0].text == "<answer>1</answer>"
    with pytest.raises(DataError, match=r"bad.parquet row 1, field 'experts'"):
        store.get(["b"], k=1)


def test_additions_persist_across_actor_restart(ray_local, dataset, tiny_models, tmp_path):
    cfg = Config()
    cfg.data.train_files, cfg.model.path, cfg.trainer.output_dir = (dataset, tiny_models["tiny-qwen2"],
                                                                     str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-qwen2"])
    mine = "<think>my own</think><answer>0</answer>"
    store = ExpertStore.from_config(cfg)
    assert ray.get_actor("expert-store") is not None
    assert [r.text for r in ray.get(store.get.remote(["ex-0"], 5))["ex-0"]] == EXPERTS["ex-0"]
    ray.get(store.add.remote("ex-0", mine, "model-x"))
    ray.get(store.add.remote("new-prompt", "<answer>n</answer>", "model-y"))
    # invalid additions are refused with the field named, and nothing of them is stored
    with pytest.raises(TypeError, match="field 'trajectory_text'"):
        ray.get(store.add.remote("ex-0", 123, "model-x"))
    with pytest.raises(ValueError, match="field 'prompt_id'"):
        ray.get(store.add.remote("", mine, "model-x"))
    with pytest.raises(ValueError, match="field 'source'"):
        ray.get(store.add.remote("ex-0", mine, "dataset"))
    got = ray.get(store.get.remote(["ex-0"], 5))["ex-0"]
    assert (got[1].text, got[1].source) == (mine, "model-x")
    assert got[1].token_ids.tolist() == expected_ids(tokenizer, mine)
    assert ray.get(store.state.remote())["additions"] == 2

    ray.kill(store)
    store = ExpertStore.from_config(cfg)  # a new actor over the same directory
    got = ray.get(store.get.remote(["ex-0", "new-prompt"], 5))
    assert [(r.text, r.source) for r in got["ex-0"]] == [(EXPERTS["ex-0"][0], "dataset"), (mine, "model-x")]
    assert [(r.text, r.source) for r in got["new-prompt"]] == [("<answer>n</answer>", "model-y")]
    assert got["ex-0"][1].token_ids.tolist() == expected_ids(tokenizer, mine)
    ray.kill(store)

    assert os.listdir(tmp_path / "experts") == [ADDITIONS_FILE]  # no temp file left behind
    table = pq.read_table(tmp_path / "experts" / ADDITIONS_FILE)
    assert table.column("prompt_id").to_pylist() == ["ex-0", "new-prompt"]
    assert table.column("source").to_pylist() == ["model-x", "model-y"]
