"""Reading examples from parquet, validated at the edge, and the seeded, resumable prompt sampler.

Two on-disk formats are accepted and told apart per file from its schema:

- calibrl (`EXAMPLE_SCHEMA`): `prompt` is a string with `<image>` placeholders, `answer` a string,
  `images` a list of encoded image bytes, `experts` a list of strings. Only `prompt` and `answer`
  are required; a missing `id` becomes `"{file_stem}:{row}"`, a missing `data_source` the file stem.
- reference (the authors' verl fork): `prompt` is a list of chat messages `{role, content}` with
  `<image>` placeholders in the content strings, `images` a list of `{bytes, path}` structs,
  `reward_model.ground_truth` the answer, the expert chain of thought in the column named by
  `expert_key` (`solution` by default; a string or a list of strings), `data_source` optional, and
  the id `"{file_stem}:{extra_info.index}"` (or `"{file_stem}:{row}"`). The stem keeps ids unique
  when several files each number their rows from 0.
  The prompt text is the system and user message contents joined with "\\n" in message order:
  a system message is kept (it is part of what the authors' model saw) and leads the single user
  turn that `to_chat_messages` later builds. Any other role in a prompt is a bad row.

Either `images` layout (list of bytes, list of `{bytes}` structs) is accepted in either format.
Files are read `batch_rows` rows at a time with `ParquetFile.iter_batches`, never whole.

Each row is checked; the first problem found makes it a bad row: no or empty answer; an image
whose bytes are absent or do not decode; `<image>` count different from the image count; more
images than `max_images`; an expert that is not a non-empty string; a prompt longer than
`max_prompt_length` tokens (measured by the caller's `prompt_length` callable, since only the
tokenizer and image processor know). `on_bad_row="error"` raises `DataError` naming the file, the
0-based row index within the file and the field; `"skip"` drops the row and counts it in the
`ReadReport`. A file whose columns do not fit either format is an error under both policies.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from calibrl.data.schema import Example

BAD_ROW_POLICIES = ("error", "skip")
REPORT_MESSAGES = 5  # bad-row messages kept verbatim per file


class DataError(ValueError):
    """A bad file or row. `row` is the 0-based row index within the file (None: the whole file)."""

    def __init__(self, path: str, row: int | None, field: str, message: str, reason: str = "invalid"):
        self.path, self.row, self.field, self.reason = path, row, field, reason
        where = f"{path} row {row}" if row is not None else str(path)
        super().__init__(f"{where}, field '{field}': {message}")


class BadRow(Exception):
    """Raised inside row conversion; turned into a DataError with the file and row attached."""

    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


@dataclass
class FileReport:
    path: str
    format: str
    """`calibrl` or `reference`."""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Skipped rows by `"field: reason"`."""
    messages: list[str] = field(default_factory=list)
    """The first few bad-row messages, verbatim."""
    rows_without_experts: int = 0
    """Kept rows that carry no expert trajectory."""

    def count_bad_row(self, err: DataError) -> None:
        self.skipped[f"{err.field}: {err.reason}"] += 1
        if len(self.messages) < REPORT_MESSAGES:
            self.messages.append(str(err))


@dataclass
class ReadReport:
    files: list[FileReport] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_kept(self) -> int:
        return sum(f.rows_kept for f in self.files)

    @property
    def rows_skipped(self) -> int:
        return sum(sum(f.skipped.values()) for f in self.files)

    @property
    def skipped(self) -> Counter:
        total: Counter = Counter()
        for f in self.files:
            total.update(f.skipped)
        return total

    def summary(self) -> str:
        lines = []
        for f in self.files:
            line = f"{f.path} ({f.format}): {f.rows_kept}/{f.rows_read} rows kept"
            if f.skipped:
                line += "; skipped " + ", ".join(f"{k} x{v}" for k, v in sorted(f.skipped.items()))
            if f.rows_without_experts:
                line += f"; {f.rows_without_experts} rows without expert"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows_read": self.rows_read, "rows_kept": self.rows_kept, "rows_skipped": self.rows_skipped,
                "files": [{"path": f.path, "format": f.format, "rows_read": f.rows_read,
                           "rows_kept": f.rows_kept, "skipped": dict(f.skipped), "messages": list(f.messages),
                           "rows_without_experts": f.rows_without_experts} for f in self.files]}


# ---------------------------------------------------------------------------------------------
# Format detection: which columns hold which Example field


@dataclass(frozen=True)
class _Layout:
    format: str
    columns: list[str]  # top-level columns to read
    answer: str  # field name used in messages
    experts: str | None
    images: str | None
    data_source: str | None
    id: str | None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _struct_field(t: pa.DataType, name: str) -> pa.Field | None:
    if pa.types.is_struct(t) and t.get_field_index(name) >= 0:
        return t.field(name)
    return None


def detect_layout(path: str, schema: pa.Schema, expert_key: str) -> _Layout:
    def fail(field_name: str, message: str) -> DataError:
        return DataError(path, None, field_name, message, reason="schema")

    names = set(schema.names)
    if "prompt" not in names:
        raise fail("prompt", "column missing: a calibrl or reference-format file needs a `prompt` column")
    prompt_t = schema.field("prompt").type
    if _is_string(prompt_t):
        fmt = "calibrl"
    elif _is_list(prompt_t) and _struct_field(prompt_t.value_type, "content") is not None \
            and _struct_field(prompt_t.value_type, "role") is not None:
        if not _is_string(prompt_t.value_type.field("content").type):
            raise fail("prompt", f"message content is {prompt_t.value_type.field('content').type}, "
                                 "expected a string with <image> placeholders")
        fmt = "reference"
    else:
        raise fail("prompt", f"type {prompt_t} is neither a string (calibrl) nor a list of "
                             "{role, content} messages (reference format)")

    if "images" in names:
        images_t = schema.field("images").type
        item = images_t.value_type if _is_list(images_t) else None
        bytes_field = _struct_field(item, "bytes") if item is not None else None
        struct_of_bytes = bytes_field is not None and _is_binary(bytes_field.type)
        if item is None or not (_is_binary(item) or struct_of_bytes):
            raise fail("images", f"type {images_t} is neither a list of binary nor a list of {{bytes}} "
                                 "structs")
    images = "images" if "images" in names else None
    data_source = "data_source" if "data_source" in names else None
    if data_source and not _is_string(schema.field("data_source").type):
        raise fail("data_source", f"type {schema.field('data_source').type}, expected a string")

    if fmt == "calibrl":
        if "answer" not in names:
            raise fail("answer", "column missing: calibrl files need an `answer` column (ground truth)")
        if not _is_string(schema.field("answer").type):
            raise fail("answer", f"type {schema.field('answer').type}, expected a string")
        if "id" in names and not _is_string(schema.field("id").type):
            raise fail("id", f"type {schema.field('id').type}, expected a string")
        experts = "experts" if "experts" in names else None
        id_col = "id" if "id" in names else None
        answer = "answer"
        columns = ["prompt", "answer"]
    else:
        gt = None
        if "reward_model" in names:
            gt = _struct_field(schema.field("reward_model").type, "ground_truth")
        if gt is None:
            raise fail("reward_model.ground_truth", "column missing: reference-format files need "
                                                    "`reward_model` with a `ground_truth` field")
        if not (_is_string(gt.type) or pa.types.is_integer(gt.type)):
            raise fail("reward_model.ground_truth", f"type {gt.type}, expected a string")
        experts = expert_key if expert_key in names else None
        has_index = "extra_info" in names and \
            _struct_field(schema.field("extra_info").type, "index") is not None
        id_col = "extra_info.index" if has_index else None
        answer = "reward_model.ground_truth"
        columns = ["prompt", "reward_model"] + (["extra_info"] if has_index else [])
    columns += [c for c in (images, experts, data_source, id_col) if c and "." not in c and c not in columns]
    return _Layout(fmt, columns, answer, experts, images, data_source, id_col)


# ---------------------------------------------------------------------------------------------
# Row conversion and checks


def _prompt_text(layout: _Layout, value) -> str:
    if value is None:
        raise BadRow("prompt", "missing", "missing prompt")
    if layout.format == "calibrl":
        text = value
    else:
        texts = []
        for message in value:
            role = (message or {}).get("role")
            if role not in ("system", "user"):
                raise BadRow("prompt", "role", f"message role {role!r}: only system and user messages "
                                                "are supported in a prompt")
            texts.append(message.get("content") or "")
        if not any(m.get("role") == "user" for m in value):
            raise BadRow("prompt", "missing", "no user message in the prompt")
        text = "\n".join(texts)
    if not text.strip():
        raise BadRow("prompt", "empty", "empty prompt")
    return text


def _answer(layout: _Layout, record: dict) -> str:
    if layout.format == "calibrl":
        value = record["answer"]
    else:
        value = (record["reward_model"] or {}).get("ground_truth")
    if value is None or not str(value).strip():
        raise BadRow(layout.answer, "missing", "missing ground-truth answer")
    return str(value)


def _images(value) -> tuple[bytes, ...]:
    images = []
    for k, item in enumerate(value or []):
        data = item.get("bytes") if isinstance(item, dict) else item
        if not data:
            hint = ""
            if isinstance(item, dict):
                hint = f" (path={item.get('path')!r}; only embedded bytes are read)"
            raise BadRow("images", "missing", f"image {k} has no bytes{hint}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, which still reads every byte
                img.load()  # decodes the pixels: verify() alone misses truncated JPEG data
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise BadRow("images", "undecodable", f"image {k} does not decode: {e}") from None
        images.append(bytes(data))
    return tuple(images)


def parse_experts(layout: _Layout, value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRow(layout.experts, "not_a_string",
                      f"expert is {type(value).__name__}, expected a string or a list of strings")
    for k, e in enumerate(items):
        if not isinstance(e, str):
            raise BadRow(layout.experts, "not_a_string",
                          f"expert {k} is {type(e).__name__}, expected a string")
        if not e.strip():
            raise BadRow(layout.experts, "empty", f"expert {k} is empty")
    return tuple(items)


def example_id(layout: _Layout, record: dict, stem: str, row: int) -> str:
    if layout.id == "id" and record["id"]:
        return record["id"]
    if layout.id == "extra_info.index" and (record["extra_info"] or {}).get("index") is not None:
        return f"{stem}:{record['extra_info']['index']}"
    return f"{stem}:{row}"


def _to_example(layout: _Layout, record: dict, *, stem: str, row: int, max_images: int | None,
                max_prompt_length: int | None, prompt_length: Callable[[Example], int] | None) -> Example:
    prompt = _prompt_text(layout, record["prompt"])
    answer = _answer(layout, record)
    images = _images(record[layout.images]) if layout.images else ()
    placeholders = prompt.count("<image>")
    if placeholders != len(images):
        raise BadRow("prompt", "image_count_mismatch",
                      f"{placeholders} <image> placeholders but {len(images)} images")
    if max_images is not None and len(images) > max_images:
        raise BadRow("images", "too_many",
                      f"{len(images)} images, more than max_images_per_prompt={max_images}")
    experts = parse_experts(layout, record[layout.experts]) if layout.experts else ()
    source = (record[layout.data_source] if layout.data_source else None) or stem
    example = Example(id=example_id(layout, record, stem, row), prompt=prompt, images=images, answer=answer,
                      experts=experts, data_source=source)
    if prompt_length is not None and max_prompt_length is not None:
        n = prompt_length(example)
        if n > max_prompt_length:
            raise BadRow("prompt", "too_long", f"prompt is {n} tokens, longer than max_prompt_length="
                                                f"{max_prompt_length}")
    return example


# ---------------------------------------------------------------------------------------------
# Public reading API


def _iter_rows(path, *, expert_key: str, max_images: int | None, max_prompt_length: int | None,
               on_bad_row: str, batch_rows: int, prompt_length,
               report: ReadReport | None) -> Iterator[tuple[int, Example]]:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: use one of {BAD_ROW_POLICIES}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows} must be >= 1")
    path = os.fspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    parquet = pq.ParquetFile(path)
    layout = detect_layout(path, parquet.schema_arrow, expert_key)
    file_report = FileReport(path=path, format=layout.format)
    if report is not None:
        report.files.append(file_report)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=layout.columns):
        for record in batch.to_pylist():
            file_report.rows_read += 1
            try:
                example = _to_example(layout, record, stem=stem, row=row, max_images=max_images,
                                      max_prompt_length=max_prompt_length, prompt_length=prompt_length)
            except BadRow as bad:
                err = DataError(path, row, bad.field, bad.message, reason=bad.reason)
                if on_bad_row == "error":
                    raise err from None
                file_report.count_bad_row(err)
            else:
                file_report.rows_kept += 1
                file_report.rows_without_experts += not example.experts
                yield row, example
            row += 1


def iter_examples(path: str | os.PathLike, *, expert_key: str = "solution", max_images: int | None = None,
                  max_prompt_length: int | None = None, on_bad_row: str = "error", batch_rows: int = 1024,
                  prompt_length: Callable[[Example], int] | None = None,
                  report: ReadReport | None = None) -> Iterator[Example]:
    """Examples of one parquet file, in row order, read `batch_rows` rows at a time.

    expert_key: reference-format column holding the expert trajectory (calibrl files use `experts`).
    max_images: most images per prompt (None: no limit).
    max_prompt_length / prompt_length: a row whose `prompt_length(example)` (tokens, image tokens
        included) exceeds max_prompt_length is bad; the check is off unless both are given.
    on_bad_row: `error` raises DataError at the first bad row; `skip` drops and counts it.
    report: when given, a FileReport for this file is appended to it and filled while iterating.
    """
    for _, example in _iter_rows(path, expert_key=expert_key, max_images=max_images,
                                 max_prompt_length=max_prompt_length, on_bad_row=on_bad_row,
                                 batch_rows=batch_rows, prompt_length=prompt_length, report=report):
        yield example


def load_examples(paths: str | os.PathLike | Sequence[str | os.PathLike], *, expert_key: str = "solution",
                  max_images: int | None = None, max_prompt_length: int | None = None,
                  on_bad_row: str = "error", batch_rows: int = 1024,
                  prompt_length: Callable[[Example], int] | None = None) -> tuple[list[Example], ReadReport]:
    """All examples of `paths` (in order) and the report. Arguments as in `iter_examples`.

    Ids must be unique across the files: a repeated id is a bad row (field `id`) of the later file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = ReadReport()
    examples: list[Example] = []
    seen: dict[str, tuple[str, int]] = {}
    for path in paths:
        for row, example in _iter_rows(path, expert_key=expert_key, max_images=max_images,
                                       max_prompt_length=max_prompt_length, on_bad_row=on_bad_row,
                                       batch_rows=batch_rows, prompt_length=prompt_length, report=report):
            if example.id in seen:
                first_path, first_row = seen[example.id]
                err = DataError(os.fspath(path), row, "id",
                                f"duplicate id {example.id!r} (first in {first_path} row {first_row})",
                                reason="duplicate")
                if on_bad_row == "error":
                    raise err
                file_report = report.files[-1]
                file_report.rows_kept -= 1
                file_report.rows_without_experts -= not example.experts
                file_report.count_bad_row(err)
                continue
            seen[example.id] = (os.fspath(path), row)
            examples.append(example)
    return examples, report


# ---------------------------------------------------------------------------------------------
# Prompt sampling

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """An endless, seeded stream of batches of `prompts_per_step` items, resumable from `state_dict()`.

    Epoch e visits every item once in the order `default_rng([seed, e]).permutation(n)` (or in file
    order with shuffle=False). Batches are cut from the concatenation of epochs: a batch that
    reaches the end of an epoch is completed from the start of the next one, so no item is dropped
    and a batch is never empty (with prompts_per_step > n a batch spans several epochs and repeats
    items). The state is (epoch, position in that epoch's order); a sampler restored from it draws
    exactly the batches the original would have drawn next.
    """

    def __init__(self, items: Sequence[T], prompts_per_step: int, *, seed: int, shuffle: bool = True):
        if len(items) == 0:
            raise ValueError("PromptSampler needs at least one example")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1")
        self.items = items
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into `items` in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            n = len(self.items)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.prompts_per_step:
            order = self.epoch_order(self.epoch)
            take = order[self.position:self.position + self.prompts_per_step - len(indices)]
            indices.extend(int(i) for i in take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_batch(self) -> list[T]:
        return [self.items[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_examples": len(self.items),
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position). The data, seed and shuffle flag must be those of the saved run."""
        mine = self.state_dict()
        for key in ("num_examples", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                                 f"{key}={mine[key]!r}: resuming would not draw the same prompts")
        if not 0 <= state["position"] <= len(self.items) or state["epoch"] < 0:
            raise ValueError(f"sampler state epoch={state['epoch']} position={state['position']} is out of "
                             f"range for {len(self.items)} examples")
        self.epoch, self.position = state["epoch"], state["position"]
        if self.position == len(self.items):
            self.epoch, self.position = self.epoch + 1, 0
