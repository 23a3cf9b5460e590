"""Builders for parquet files in both accepted formats (calibrl and the reference implementation's)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color=(200, 30, 30), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def noise_jpeg(size=32) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def good_row(i: int) -> dict:
    """Neutral description of a valid row: one image, one placeholder, an answer and an expert."""
    return {"question": f"<image> How many red shapes are there? ({i})", "images": [png((i * 7 % 256, 0, 0))],
            "answer": str(i), "experts": [f"<think>{i}</think><answer>{i}</answer>"]}


CALIBRL_FILE_SCHEMA = pa.schema([  # EXAMPLE_SCHEMA without the not-null flags, so bad rows can be written
    ("id", pa.string()), ("prompt", pa.string()), ("images", pa.list_(pa.binary())), ("answer", pa.string()),
    ("experts", pa.list_(pa.string())), ("data_source", pa.string())])

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def reference_schema(expert_key="solution", expert_type=None) -> pa.Schema:
    expert_type = expert_type or pa.string()
    return pa.schema([
        ("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("images", pa.list_(IMAGE_STRUCT)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
        (expert_key, expert_type)])


def write_calibrl(path, rows, row_group_rows=None):
    records = [{"id": f"ex-{i}", "prompt": r["question"], "images": r["images"], "answer": r["answer"],
                "experts": r["experts"], "data_source": "test"} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(records, schema=CALIBRL_FILE_SCHEMA), path,
                   row_group_size=row_group_rows)
    return str(path)


def write_reference(path, rows, *, expert_key="solution", expert_type=None, system=None,
                    row_group_rows=None):
    records = []
    for i, r in enumerate(rows):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": r["question"]}]
        experts = r["experts"]
        if expert_type is None and isinstance(experts, list):  # a plain `solution` string column
            experts = experts[0] if experts else None
        records.append({"data_source": "geo", "prompt": messages,
                        "images": [{"bytes": b, "path": None} for b in r["images"]], "ability": "math",
                        "reward_model": {"ground_truth": r["answer"], "style": "rule"},
                        "extra_info": {"index": 100 + i, "split": "train"}, expert_key: experts})
    table = pa.Table.from_pylist(records, schema=reference_schema(expert_key, expert_type))
    pq.write_table(table, path, row_group_size=row_group_rows)
    return str(path)
