"""Atomic parquet writes: a reader never sees a partly written file, and a crash mid-write leaves
the previous file (or none) in place."""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet_atomic(path: str | os.PathLike, table: pa.Table, **write_table_kwargs) -> str:
    """Write `table` to `path` via a temp file in the same directory, fsync, then os.replace.

    Missing parent directories are created; the file gets mode 0644. `write_table_kwargs` go to
    `pyarrow.parquet.write_table` (e.g. `row_group_size`). Returns `path` as a str.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, **write_table_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
