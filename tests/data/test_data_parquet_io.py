import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl.data import write_parquet_atomic


def test_write_parquet_atomic_writes_replaces_and_passes_kwargs(tmp_path):
    path = tmp_path / "sub" / "t.parquet"  # missing parent directories are created
    assert write_parquet_atomic(path, pa.table({"x": [1, 2, 3]})) == str(path)
    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

    write_parquet_atomic(path, pa.table({"x": list(range(10))}), row_group_size=4)
    assert pq.read_table(path).column("x").to_pylist() == list(range(10))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert os.listdir(path.parent) == ["t.parquet"]  # no temp file left behind


def test_write_parquet_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet_atomic(path, pa.table({"x": [1]}))
    with pytest.raises(TypeError):
        write_parquet_atomic(path, pa.table({"x": [2]}), no_such_option=1)
    assert pq.read_table(path).column("x").to_pylist() == [1]
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_reader_keeps_the_names_other_modules_import():
    from calibrl.data.layout import detect_layout, example_id, parse_experts
    from calibrl.data.reader import BadRow, DataError
    from calibrl.data.reader import detect_layout as reader_detect_layout
    from calibrl.data.reader import example_id as reader_example_id
    from calibrl.data.reader import parse_experts as reader_parse_experts

    assert (reader_detect_layout, reader_example_id, reader_parse_experts) == \
        (detect_layout, example_id, parse_experts)
    assert issubclass(DataError, ValueError) and issubclass(BadRow, Exception)
