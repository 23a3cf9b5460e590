import os

import pyarrow.parquet as pq
from data_helpers import png

from calibrl.data import EXAMPLE_SCHEMA, Example, examples_to_table, load_examples, write_examples


def _examples():
    return [Example(id="a", prompt="<image> q1", images=(png(),), answer="1",
                    experts=("<think>x</think><answer>1</answer>",), data_source="s1"),
            Example(id="b", prompt="<image><image> q2", images=(png((0, 0, 255)), png((0, 255, 0), 12)),
                    answer="two", experts=("e1", "e2"), data_source="s2"),
            Example(id="c", prompt="text only", images=(), answer="3", experts=(), data_source="s1")]


def test_round_trip_keeps_schema_and_values(tmp_path):
    path = write_examples(tmp_path / "sub" / "ex.parquet", _examples())
    assert pq.read_schema(path).equals(EXAMPLE_SCHEMA)
    loaded, report = load_examples([path])
    assert loaded == _examples()
    assert report.rows_read == report.rows_kept == 3 and report.files[0].format == "calibrl"
    assert report.files[0].rows_without_experts == 1
    assert os.listdir(tmp_path / "sub") == ["ex.parquet"]  # the temp file was renamed, not left behind


def test_table_has_the_explicit_schema():
    table = examples_to_table(_examples())
    assert table.schema.equals(EXAMPLE_SCHEMA)
    assert table.column("images").to_pylist()[1][1] == png((0, 255, 0), 12)
