"""Reading examples from parquet, validated at the edge.

Files may be in the calibrl or the reference (verl fork) format, told apart per file from its
schema; the formats, and the checks each row goes through, are described in `calibrl.data.layout`.
Files are read `batch_rows` rows at a time with `ParquetFile.iter_batches`, never whole.

The first problem found in a row makes it a bad row. `on_bad_row="error"` raises `DataError`
naming the file, the 0-based row index within the file and the field; `"skip"` drops the row and
counts it in the `ReadReport`. A file whose columns do not fit either format is an error under both
policies. Ids must be unique across the files given to `load_examples`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from calibrl.data.errors import BadRow, DataError
from calibrl.data.layout import detect_layout, example_id, parse_experts, to_example
from calibrl.data.schema import Example

__all__ = [  # BadRow, detect_layout, example_id and parse_experts are re-exported for actors/expert_store.py
    "BAD_ROW_POLICIES",
    "BadRow",
    "DataError",
    "FileReport",
    "ReadReport",
    "detect_layout",
    "example_id",
    "iter_examples",
    "load_examples",
    "parse_experts",
]

BAD_ROW_POLICIES = ("error", "skip")
REPORT_MESSAGES = 5  # bad-row messages kept verbatim per file


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
# Public reading API


def open_parquet(path: str) -> pq.ParquetFile:
    """The file as a ParquetFile, or a DataError naming it (missing, unreadable, not parquet)."""
    if not os.path.exists(path):
        raise DataError(path, None, "(file)", "no such file", reason="missing")
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(path, None, "(file)", f"not a readable parquet file ({e})",
                        reason="unreadable") from None


def _iter_rows(path, *, expert_key: str, max_images: int | None, max_prompt_length: int | None,
               on_bad_row: str, batch_rows: int, prompt_length,
               report: ReadReport | None) -> Iterator[tuple[int, Example]]:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: use one of {BAD_ROW_POLICIES}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows} must be >= 1")
    path = os.fspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    parquet = open_parquet(path)
    layout = detect_layout(path, parquet.schema_arrow, expert_key)
    file_report = FileReport(path=path, format=layout.format)
    if report is not None:
        report.files.append(file_report)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=layout.columns):
        for record in batch.to_pylist():
            file_report.rows_read += 1
            try:
                example = to_example(layout, record, stem=stem, row=row, max_images=max_images,
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
