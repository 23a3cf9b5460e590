"""The calibrl example: one training or evaluation prompt with its ground truth and expert trajectories.

On disk an example is one parquet row in `EXAMPLE_SCHEMA`; in memory it is a frozen `Example`.
Images stay encoded (PNG/JPEG bytes) until a consumer decodes them: they are small on the wire and
cheap to put in Ray's object store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from calibrl.data.parquet_io import write_parquet_atomic
from calibrl.data.prompts import IMAGE_PLACEHOLDER

EXAMPLE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # text with one `<image>` per image
    pa.field("images", pa.list_(pa.binary()), nullable=False),  # encoded PNG/JPEG bytes
    pa.field("answer", pa.string(), nullable=False),  # ground truth for the verifier
    pa.field("experts", pa.list_(pa.string()), nullable=False),  # expert trajectories (chains of thought)
    pa.field("data_source", pa.string(), nullable=False),  # for per-source evaluation metrics
])


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    """Prompt text with one `<image>` placeholder per entry of `images`."""
    images: tuple[bytes, ...]
    """Encoded images (PNG/JPEG bytes), in placeholder order."""
    answer: str
    """Ground-truth answer the verifier compares against."""
    experts: tuple[str, ...]
    """Expert trajectories (`<think>...</think><answer>...</answer>`); may be empty."""
    data_source: str

    @property
    def num_placeholders(self) -> int:
        return self.prompt.count(IMAGE_PLACEHOLDER)


def examples_to_table(examples: Sequence[Example]) -> pa.Table:
    rows = [{"id": e.id, "prompt": e.prompt, "images": list(e.images), "answer": e.answer,
             "experts": list(e.experts), "data_source": e.data_source} for e in examples]
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def write_examples(path: str | os.PathLike, examples: Sequence[Example], *, row_group_rows: int = 512) -> str:
    """Write examples to parquet atomically (`write_parquet_atomic`: temp file in the same directory,
    fsync, then os.replace).

    Row groups of `row_group_rows` keep later batched reads from holding a whole file in memory.
    """
    return write_parquet_atomic(path, examples_to_table(examples), row_group_size=row_group_rows)
