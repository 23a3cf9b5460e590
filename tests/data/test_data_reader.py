import copy

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import good_row, noise_jpeg, png, write_calibrl, write_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrl.data import DataError, ReadReport, iter_examples, load_examples

SYSTEM = "You are a careful assistant."


def test_reference_format_loads(tmp_path):
    rows = [good_row(i) for i in range(3)]
    rows[1]["images"] = [noise_jpeg()]
    rows[2] = {**rows[2], "question": "What is 2 + 2?", "images": [], "experts": None}
    path = write_reference(tmp_path / "geo3k.parquet", rows, system=SYSTEM)
    examples, report = load_examples(path, max_images=1)
    assert [e.id for e in examples] == ["geo3k:100", "geo3k:101", "geo3k:102"]  # extra_info.index
    first = examples[0]
    assert first.prompt == SYSTEM + "\n" + rows[0]["question"]  # system text leads the user text
    assert first.images == tuple(rows[0]["images"])
    assert first.answer == "0" and first.data_source == "geo"
    assert first.experts == (rows[0]["experts"][0],)
    assert examples[2].images == () and examples[2].experts == ()
    assert report.files[0].format == "reference" and report.files[0].rows_without_experts == 1


def test_reference_format_custom_expert_key_with_several_experts(tmp_path):
    rows = [{**good_row(i), "experts": [f"<think>a{i}</think><answer>{i}</answer>", f"b{i}"]}
            for i in range(2)]
    path = write_reference(tmp_path / "ref.parquet", rows, expert_key="target",
                           expert_type=pa.list_(pa.string()))
    examples, _ = load_examples([path], expert_key="target")
    assert [e.experts for e in examples] == [tuple(r["experts"]) for r in rows]
    # the default key finds no expert column: rows load, without experts, and the report says so
    examples, report = load_examples([path])
    assert all(e.experts == () for e in examples) and report.files[0].rows_without_experts == 2


def test_reference_format_without_index_uses_stem_and_row(tmp_path):
    table = pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]],
                      "reward_model": [{"ground_truth": "2"}],
                      "solution": ["<think>1+1</think><answer>2</answer>"]})
    pq.write_table(table, tmp_path / "plain.parquet")
    (example,), _ = load_examples([tmp_path / "plain.parquet"])
    assert (example.id, example.data_source, example.images, example.answer) == ("plain:0", "plain", (), "2")


# ----------------------------------------------------------------------------------------------
# Bad rows: (kind, corruption of a neutral row, field for calibrl files, field for reference files)

TRUNCATED_PNG = png(size=32)[:60]
TRUNCATED_JPEG = noise_jpeg()[:-200]  # header intact, scan data cut short


def _missing_answer(r):
    r["answer"] = None


def _blank_answer(r):
    r["answer"] = "  "


def _junk_image(r):
    r["images"] = [b"definitely not an image"]


def _truncated_image(r):
    r["images"] = [TRUNCATED_PNG]


def _truncated_jpeg(r):
    r["images"] = [TRUNCATED_JPEG]


def _count_mismatch(r):
    r["question"] = "<image> left <image> right"


def _too_many_images(r):
    r["question"] = "<image><image> two pictures"
    r["images"] = [png(), png()]


def _too_long(r):
    r["question"] = "<image> " + "long " * 40


def _non_string_expert(r):
    r["experts"] = ["<think>ok</think><answer>1</answer>", None]


BAD_ROWS = {
    "missing answer": (_missing_answer, "answer", "reward_model.ground_truth", "answer: missing"),
    "blank answer": (_blank_answer, "answer", "reward_model.ground_truth", "answer: missing"),
    "undecodable image": (_junk_image, "images", "images", "images: undecodable"),
    "truncated image": (_truncated_image, "images", "images", "images: undecodable"),
    "truncated jpeg": (_truncated_jpeg, "images", "images", "images: undecodable"),
    "placeholder count": (_count_mismatch, "prompt", "prompt", "prompt: image_count_mismatch"),
    "too many images": (_too_many_images, "images", "images", "images: too_many"),
    "prompt too long": (_too_long, "prompt", "prompt", "prompt: too_long"),
    "non-string expert": (_non_string_expert, "experts", "target", "experts: not_a_string"),
}
READ_ARGS = {"max_images": 1, "max_prompt_length": 100, "prompt_length": lambda e: len(e.prompt),
             "batch_rows": 8}


def _write(fmt, path, rows):
    if fmt == "calibrl":
        return write_calibrl(path, rows)
    return write_reference(path, rows, expert_key="target", expert_type=pa.list_(pa.string()))


@pytest.mark.parametrize("fmt", ["calibrl", "reference"])
@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_row_error_names_file_row_and_field(tmp_path, fmt, kind):
    corrupt, calibrl_field, reference_field, _ = BAD_ROWS[kind]
    rows = [good_row(i) for i in range(20)]
    corrupt(rows[17])
    path = _write(fmt, tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as info:
        load_examples([path], expert_key="target", **READ_ARGS)
    field = calibrl_field if fmt == "calibrl" else reference_field
    message = str(info.value)
    assert "bad.parquet row 17" in message and f"field '{field}'" in message, message
    assert (info.value.row, info.value.field) == (17, field)


@pytest.mark.parametrize("fmt", ["calibrl", "reference"])
def test_skip_drops_and_counts_every_bad_row(tmp_path, fmt):
    rows = [good_row(i) for i in range(40)]
    bad_at = {}
    for k, kind in enumerate(BAD_ROWS):
        row = 3 + 4 * k
        BAD_ROWS[kind][0](rows[row])
        bad_at[row] = kind
    path = _write(fmt, tmp_path / "mixed.parquet", rows)
    examples, report = load_examples([path], expert_key="target", on_bad_row="skip", **READ_ARGS)
    # good rows all survive, in order
    assert [e.id for e in examples] == [f"ex-{i}" if fmt == "calibrl" else f"mixed:{100 + i}"
                                        for i in range(40) if i not in bad_at]
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (40, 40 - len(bad_at), len(bad_at))
    expected = {}
    for kind in bad_at.values():
        key = BAD_ROWS[kind][3]
        if fmt == "reference":
            key = key.replace("answer:", "reward_model.ground_truth:").replace("experts:", "target:")
        expected[key] = expected.get(key, 0) + 1
    assert dict(report.skipped) == expected
    assert len(report.files[0].messages) == 5 and "mixed.parquet row 3" in report.files[0].messages[0]


def test_non_string_expert_column(tmp_path):
    rows = [good_row(i) for i in range(3)]
    records = []
    for i, r in enumerate(rows):
        records.append({"prompt": [{"role": "user", "content": r["question"]}],
                        "images": [{"bytes": r["images"][0], "path": None}],
                        "reward_model": {"ground_truth": r["answer"]}, "solution": i})
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet row 0, field 'solution': expert is int"):
        load_examples([tmp_path / "ints.parquet"])
    examples, report = load_examples([tmp_path / "ints.parquet"], on_bad_row="skip")
    assert examples == [] and report.skipped == {"solution: not_a_string": 3}


def test_file_of_unknown_layout_is_an_error(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2], "answer": ["1", "2"]}), tmp_path / "odd.parquet")
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=r"odd.parquet, field 'prompt'"):
            load_examples([tmp_path / "odd.parquet"], on_bad_row=policy)
    pq.write_table(pa.table({"prompt": ["<image> q"]}), tmp_path / "noanswer.parquet")
    with pytest.raises(DataError, match=r"noanswer.parquet, field 'answer': column missing"):
        load_examples([tmp_path / "noanswer.parquet"])


def test_duplicate_ids_across_files(tmp_path):
    rows = [good_row(i) for i in range(3)]
    a = write_calibrl(tmp_path / "a.parquet", rows)
    b = write_calibrl(tmp_path / "b.parquet", rows[:2])  # ids ex-0, ex-1 again
    with pytest.raises(DataError, match=r"b.parquet row 0, field 'id': duplicate id 'ex-0'"):
        load_examples([a, b])
    examples, report = load_examples([a, b], on_bad_row="skip")
    assert len(examples) == 3 and report.files[1].rows_kept == 0 and report.skipped == {"id: duplicate": 2}


def test_batched_reading_keeps_every_row_in_order(tmp_path):
    rows = [good_row(i) for i in range(25)]
    path = write_calibrl(tmp_path / "big.parquet", rows, row_group_rows=10)
    report = ReadReport()
    examples = list(iter_examples(path, batch_rows=4, report=report))
    assert [e.id for e in examples] == [f"ex-{i}" for i in range(25)]
    assert [e.answer for e in examples] == [r["answer"] for r in rows]
    assert report.rows_read == report.rows_kept == 25
    # a bad row's index counts from the start of the file, not of its batch
    bad = copy.deepcopy(rows)
    bad[22]["answer"] = None
    write_calibrl(tmp_path / "big.parquet", bad, row_group_rows=10)
    with pytest.raises(DataError, match=r"big.parquet row 22, field 'answer'"):
        list(iter_examples(path, batch_rows=4))


def test_unknown_policy_is_rejected(tmp_path):
    path = write_calibrl(tmp_path / "x.parquet", [good_row(0)])
    with pytest.raises(ValueError, match="on_bad_row"):
        load_examples([path], on_bad_row="ignore")


# ---- property: any row content ends in an Example or a DataError naming its row ------------------


ROW = st.fixed_dictionaries({
    "id": st.one_of(st.none(), st.text(max_size=8)),
    "prompt": st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["<image>", "<image><image> x"])),
    "images": st.one_of(st.none(), st.lists(st.one_of(st.binary(max_size=16), st.just(b"")), max_size=2)),
    "answer": st.one_of(st.none(), st.text(max_size=8)),
    "experts": st.one_of(st.none(), st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=3)),
    "data_source": st.one_of(st.none(), st.text(max_size=5)),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ROW, min_size=1, max_size=6))
def test_any_rows_load_or_name_the_bad_row(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from data_helpers import CALIBRL_FILE_SCHEMA

    from calibrl.data import load_examples
    from calibrl.data.errors import DataError

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIBRL_FILE_SCHEMA), path)
    try:
        examples, _ = load_examples([str(path)], on_bad_row="error")
        assert len(examples) == len(rows)
    except DataError as e:
        assert e.path == str(path) and (e.row is None or 0 <= e.row < len(rows)) and e.field
    skipped, report = load_examples([str(path)], on_bad_row="skip")  # never raises for a row
    assert len(skipped) + report.rows_skipped == len(rows)
