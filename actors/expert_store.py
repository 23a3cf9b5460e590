"""Expert-trajectory store (actor name `expert-store`): expert chains of thought keyed by prompt id,
tokenised as the assistant response, for the groups of sections 4 and 6 of docs/algorithm.md.

`ExpertStore` is a plain class; `ExpertStore.from_config(cfg)` makes the run's actor `expert-store`
(train files, the policy's tokenizer, additions under `trainer.output_dir/experts`).

Where experts come from:
- the dataset's expert column (`experts` in calibrl files, `data.expert_key` in reference files),
  read lazily: the first `get` indexes prompt id -> (file, row group, row) from the id columns only,
  and a miss reads just the expert column of the row groups it needs. Ids follow the reader's rules
  (`calibrl.data.reader`), so they equal `Example.id`; a repeated id keeps its first row, as
  `load_examples` does;
- additions (`add`), kept in memory and persisted to `<additions_dir>/additions.parquet`, rewritten
  atomically (temp file + fsync + os.replace) on every add, and reloaded when a store is built over
  the same directory (an actor restart keeps them).

Each expert is a `calibrl.algo.ExpertTrajectory`: its text tokenised as the assistant response
(`tokenizer(text, add_special_tokens=False).input_ids` + eos, a read-only int64 array) and its
source (`dataset` or the source given to `add`). A prompt's experts are its dataset experts in
column order, then its additions in insertion order.

Memory: the index (ids and integers) plus an LRU of at most `max_cached` prompts' tokenised experts.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from actors.group import named_actor
from actors.logs import actor_log_dir
from calibrl.algo import ExpertTrajectory
from calibrl.config import Config
from calibrl.data.parquet_io import write_parquet_atomic
from calibrl.data.reader import BadRow, DataError, detect_layout, example_id, parse_experts
from calibrl.inputs import response_token_ids

ADDITIONS_FILE = "additions.parquet"
ADDITIONS_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    # expert trajectory, `<think>..</think><answer>..</answer>`
    pa.field("text", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # who wrote it (e.g. a model name or "rollout")
])
DATASET_SOURCE = "dataset"
EXPERT_CHOICES = ("first", "random")


@dataclass(frozen=True)
class _Location:
    file: int
    row_group: int
    offset: int  # row within the row group
    row: int  # row within the file (for error messages)


class ExpertStore:
    def __init__(self, *, files: Sequence[str], tokenizer_path: str, additions_dir: str,
                 expert_key: str = "solution", choice: str = "first", seed: int = 0, max_cached: int = 4096):
        """files: dataset parquet files (data.train_files); tokenizer_path: local model directory;
        additions_dir: where `additions.parquet` lives; expert_key: reference-format expert column;
        choice: `first` or `random` (algorithm.expert_choice), random draws seeded by `seed`;
        max_cached: prompts whose tokenised experts are kept in memory (LRU)."""
        if choice not in EXPERT_CHOICES:
            raise ValueError(f"choice={choice!r}: use one of {EXPERT_CHOICES}")
        if max_cached < 1:
            raise ValueError(f"max_cached={max_cached} must be >= 1")
        self.files = [os.fspath(f) for f in files]
        self.expert_key = expert_key
        self.choice = choice
        self.max_cached = max_cached
        self.rng = np.random.default_rng(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer at {tokenizer_path} has no eos token")
        self.additions_path = os.path.join(os.fspath(additions_dir), ADDITIONS_FILE)
        self.additions: dict[str, list[tuple[str, str]]] = defaultdict(list)  # prompt id -> [(text, source)]
        self._additions_rows: list[dict] = []
        self._load_additions()
        self._index: dict[str, _Location] | None = None
        self._layouts: list = []  # the reader's column layout of each file
        self._cache: OrderedDict[str, list[ExpertTrajectory]] = OrderedDict()
        self.counts: Counter = Counter()

    # -- reading ------------------------------------------------------------------------------

    def _load_additions(self) -> None:
        if not os.path.exists(self.additions_path):
            return
        table = pq.read_table(self.additions_path)
        for name in ADDITIONS_SCHEMA.names:
            if name not in table.column_names:
                raise DataError(self.additions_path, None, name, "column missing", reason="schema")
        for row, record in enumerate(table.select(ADDITIONS_SCHEMA.names).to_pylist()):
            problem = _addition_problem(record["prompt_id"], record["text"], record["source"])
            if problem:
                _, field, message = problem
                raise DataError(self.additions_path, row, field, message)
            self.additions[record["prompt_id"]].append((record["text"], record["source"]))
            self._additions_rows.append(record)

    def _build_index(self) -> dict[str, _Location]:
        """prompt id -> where its experts are, from the id columns only (no expert text is read)."""
        index: dict[str, _Location] = {}
        for f, path in enumerate(self.files):
            parquet = pq.ParquetFile(path)
            layout = detect_layout(path, parquet.schema_arrow, self.expert_key)
            self._layouts.append(layout)
            if layout.experts is None:
                self.counts["files_without_expert_column"] += 1
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            id_column = {"id": "id", "extra_info.index": "extra_info"}.get(layout.id)
            row = 0
            for rg in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(rg).num_rows
                ids = (parquet.read_row_group(rg, columns=[id_column]).column(0).to_pylist() if id_column
                       else [None] * n)
                for offset, value in enumerate(ids):
                    prompt_id = example_id(layout, {id_column: value} if id_column else {}, stem, row)
                    index.setdefault(prompt_id, _Location(f, rg, offset, row))
                    row += 1
        self.counts["indexed_prompts"] = len(index)
        return index

    def _dataset_experts(self, prompt_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Expert texts of the given indexed prompts, reading each needed row group's expert column once."""
        by_group: dict[tuple[int, int], list[str]] = defaultdict(list)
        for pid in prompt_ids:
            loc = self._index[pid]
            by_group[(loc.file, loc.row_group)].append(pid)
        texts: dict[str, tuple[str, ...]] = {}
        for (f, rg), pids in by_group.items():
            path, layout = self.files[f], self._layouts[f]
            values = pq.ParquetFile(path).read_row_group(rg, columns=[layout.experts]).column(0)
            self.counts["row_groups_read"] += 1
            for pid in pids:
                loc = self._index[pid]
                try:
                    texts[pid] = parse_experts(layout, values[loc.offset].as_py())
                except BadRow as bad:
                    raise DataError(path, loc.row, bad.field, bad.message, reason=bad.reason) from None
        return texts

    def _tokenise(self, texts: list[str]) -> list[np.ndarray]:
        """Each text as the assistant response: its tokens without special tokens, then eos; read-only
        int64 arrays (they are shared with the cache, and travel through Ray without a copy)."""
        out = []
        for ids in response_token_ids(self.tokenizer, texts):
            array = np.array(ids, dtype=np.int64)
            array.flags.writeable = False
            out.append(array)
        return out

    def _records(self, prompt_ids: list[str]) -> dict[str, list[ExpertTrajectory]]:
        """All experts of each prompt, tokenised, through the LRU cache."""
        out: dict[str, list[ExpertTrajectory]] = {}
        missing = []
        for pid in prompt_ids:
            if pid in self._cache:
                self._cache.move_to_end(pid)
                out[pid] = self._cache[pid]
                self.counts["cache_hits"] += 1
            else:
                missing.append(pid)
        if not missing:
            return out
        self.counts["cache_misses"] += len(missing)
        if self._index is None:
            self._index = self._build_index()
        from_dataset = self._dataset_experts([pid for pid in missing if pid in self._index])
        pending = [(pid, text, DATASET_SOURCE) for pid in missing for text in from_dataset.get(pid, ())]
        pending += [(pid, text, source) for pid in missing for text, source in self.additions.get(pid, ())]
        token_ids = self._tokenise([text for _, text, _ in pending])
        fresh: dict[str, list[ExpertTrajectory]] = {pid: [] for pid in missing}
        for (pid, text, source), ids in zip(pending, token_ids):
            fresh[pid].append(ExpertTrajectory(token_ids=ids, text=text, source=source))
        for pid in missing:
            self.counts["unknown_prompt_ids"] += pid not in self._index and pid not in self.additions
            out[pid] = self._cache[pid] = fresh[pid]
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return out

    # -- public API ---------------------------------------------------------------------------

    def get(self, prompt_ids: Sequence[str], k: int) -> dict[str, list[ExpertTrajectory]]:
        """Up to `k` experts per prompt (fewer when a prompt has fewer; [] when it has none), as
        `calibrl.algo.ExpertTrajectory(token_ids, text, source)`; source is `dataset` or the one given
        to `add`.

        `first`: the prompt's first k experts; `random`: k drawn without replacement from the
        store's seeded generator (the draws depend on the order of calls since construction).
        """
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        prompt_ids = list(dict.fromkeys(prompt_ids))
        records = self._records(prompt_ids)
        chosen: dict[str, list[ExpertTrajectory]] = {}
        for pid in prompt_ids:
            experts = records[pid]
            if self.choice == "random" and len(experts) > k:
                chosen[pid] = [experts[i] for i in self.rng.choice(len(experts), size=k, replace=False)]
            else:
                chosen[pid] = experts[:k]
            self.counts["prompts_without_expert"] += not experts
            self.counts["experts_returned"] += len(chosen[pid])
        self.counts["get_calls"] += 1
        return chosen

    def add(self, prompt_id: str, trajectory_text: str, source: str) -> None:
        """Add an expert trajectory for `prompt_id` and persist it before returning."""
        self.add_many([(prompt_id, trajectory_text, source)])

    def add_many(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Add several (prompt_id, trajectory_text, source) at once, with one write of additions.parquet.
        Every item is checked before anything is stored; an item already stored is not stored twice."""
        for i, (prompt_id, text, source) in enumerate(items):
            problem = _addition_problem(prompt_id, text, source)
            if problem:
                error, field, message = problem
                raise error(f"ExpertStore.add: item {i}, field '{field}': {message}")
        # already stored (a call retried after the store restarted): kept once
        items = [(p, t, s) for p, t, s in items if (t, s) not in self.additions.get(p, [])]
        if not items:
            return
        rows = self._additions_rows + [{"prompt_id": p, "text": t, "source": s} for p, t, s in items]
        write_parquet_atomic(self.additions_path, pa.Table.from_pylist(rows, schema=ADDITIONS_SCHEMA))
        self._additions_rows = rows
        for prompt_id, text, source in items:
            self.additions[prompt_id].append((text, source))
            self._cache.pop(prompt_id, None)  # re-read with the addition on the next get
        self.counts["added"] += len(items)

    @classmethod
    def from_config(cls, cfg: Config, *, name: str = "expert-store", num_cpus: float = 0.5,
                    max_cached: int = 4096):
        """The run's expert-store actor: experts of `data.train_files`, tokenised with `model.path`'s
        tokenizer, chosen by `algorithm.expert_choice` (seeded by `trainer.seed`), additions in
        `trainer.output_dir/experts`. A store that dies comes back with its data and persisted additions,
        and the calls in flight are retried on it (reads and additions are idempotent)."""
        return named_actor(cls, name, num_cpus=num_cpus, files=list(cfg.data.train_files),
                           max_restarts=cfg.reliability.actor_restarts, max_task_retries=-1,
                           tokenizer_path=cfg.model.path,
                           additions_dir=os.path.join(cfg.trainer.output_dir, "experts"),
                           expert_key=cfg.data.expert_key, choice=cfg.algorithm.expert_choice,
                           seed=cfg.trainer.seed, max_cached=max_cached, log_dir=actor_log_dir(cfg))

    def rng_state(self) -> dict:
        """The state of the `random` choice's generator (checkpointed: a resumed run draws what an
        uninterrupted one would)."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def state(self) -> dict:
        """Counts for metrics: indexed prompts, cache hits/misses/size, row groups read, additions, ..."""
        return dict(self.counts) | {"cached_prompts": len(self._cache),
                                    "additions": len(self._additions_rows)}


def _addition_problem(prompt_id, text, source) -> tuple[type, str, str] | None:
    """(exception type, field, message) for an invalid addition; None for a valid one."""
    for field, value in (("prompt_id", prompt_id), ("trajectory_text", text), ("source", source)):
        if not isinstance(value, str):
            return TypeError, field, f"expected a str, got {type(value).__name__}"
        if not value.strip():
            return ValueError, field, "empty"
    if source == DATASET_SOURCE:
        return ValueError, "source", f"{DATASET_SOURCE!r} is reserved for the dataset's experts"
    return None
