"""Bad input to `calibrl train`, as a new user would give it: each kind ends in one message naming the
file, row and field or the config key (a did-you-mean for keys), exit status 2, no traceback, and
before Ray starts; `--debug` shows the traceback."""

import os
import pathlib
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from calibrl.data.synthetic import write_splits
from launch.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    """A valid run config (tiny model, synthetic data) as a dict, and the folder for bad files."""
    d = tmp_path_factory.mktemp("bad-input")
    write_splits(str(d), n_train=4, n_val=2, n_test=2, seed=0, multimodal=False, difficulty=(1,))
    cfg = {"model": {"path": tiny_models["tiny-qwen2"], "max_model_len": 512},
           "data": {"train_files": [f"{d}/train.parquet"], "val_files": [f"{d}/val.parquet"],
                    "max_prompt_length": 400},
           "rollout": {"max_response_length": 64},
           "trainer": {"output_dir": str(d / "run"), "total_steps": 1}}
    return cfg, d


def run_train(tmp_path, cfg: dict | str, *overrides, capsys) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(cfg if isinstance(cfg, str) else OmegaConf.to_yaml(OmegaConf.create(cfg)))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path), *overrides])
    return exit_info.value.code, capsys.readouterr().err


def with_data(base, path) -> dict:
    cfg, _ = base
    return OmegaConf.to_container(OmegaConf.merge(cfg, {"data": {"train_files": [str(path)]}}))


def test_a_file_that_is_not_parquet(base, tmp_path, capsys):
    bad = base[1] / "notes.parquet"
    bad.write_text("these are my notes")
    code, err = run_train(tmp_path, with_data(base, bad), capsys=capsys)
    assert code == 2 and f"{bad}, field '(file)': not a readable parquet file" in err


def test_a_parquet_without_the_expected_columns(base, tmp_path, capsys):
    bad = base[1] / "columns.parquet"
    pq.write_table(pa.table({"question": ["1 + 1?"], "solution": ["2"]}), bad)
    code, err = run_train(tmp_path, with_data(base, bad), capsys=capsys)
    assert code == 2 and f"{bad}, field 'prompt': column missing" in err


def test_a_missing_file(base, tmp_path, capsys):
    code, err = run_train(tmp_path, with_data(base, base[1] / "nowhere.parquet"), capsys=capsys)
    assert code == 2 and "data.train_files[0]=" in err and "nowhere.parquet': no such file" in err


def test_the_demo_config_without_the_demo_data_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    demo_yaml = pathlib.Path(ROOT, "configs", "cpu_demo.yaml").read_text()
    code, err = run_train(tmp_path, demo_yaml, capsys=capsys)
    assert code == 2 and "model.path='runs/demo/tiny-models/" in err and "no such directory" in err
    assert "`calibrl make-demo-data`" in err and "Traceback" not in err


def test_a_missing_file_elsewhere_gets_no_demo_hint(base, tmp_path, capsys):
    code, err = run_train(tmp_path, with_data(base, base[1] / "nowhere.parquet"), capsys=capsys)
    assert code == 2 and "make-demo-data" not in err


def test_an_unknown_key_with_a_suggestion(base, tmp_path, capsys):
    code, err = run_train(tmp_path, base[0], "learner.lrr=1", capsys=capsys)
    assert code == 2
    assert "unknown key learner.lrr (in the override 'learner.lrr=1'); did you mean learner.lr?" in err


def test_an_unknown_key_in_the_yaml(base, tmp_path, capsys):
    cfg = OmegaConf.to_container(OmegaConf.merge(base[0], {"trainer": {"totl_steps": 3}}))
    code, err = run_train(tmp_path, cfg, capsys=capsys)
    assert code == 2
    assert "unknown key trainer.totl_steps (in " in err and "did you mean trainer.total_steps?" in err


def test_a_value_of_the_wrong_type(base, tmp_path, capsys):
    code, err = run_train(tmp_path, base[0], "trainer.total_steps=many", capsys=capsys)
    assert code == 2 and "trainer.total_steps: Value 'many'" in err and "converted to Integer" in err


def test_broken_yaml(base, tmp_path, capsys):
    code, err = run_train(tmp_path, "model:\n  path: [unclosed\ntrainer:\n  total_steps: 1\n", capsys=capsys)
    assert code == 2
    assert "run.yaml: not valid YAML at line 3, column 8: did not find expected ',' or ']'" in err


def test_a_model_directory_without_weights(base, tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    code, err = run_train(tmp_path, base[0], f"model.path={empty}", capsys=capsys)
    assert code == 2 and f"model.path='{empty}': no weights there" in err


def test_an_unknown_algorithm(base, tmp_path, capsys):
    code, err = run_train(tmp_path, base[0], "algorithm.name=ppo2", capsys=capsys)
    assert code == 2 and "algorithm.name='ppo2' is unknown; choose one of" in err


def test_a_bad_row(base, tmp_path, capsys):
    bad = base[1] / "rows.parquet"
    rows = {"prompt": ["What is 1 + 1?", ""], "answer": ["2", "3"], "solution": ["2", "3"]}
    pq.write_table(pa.table(rows), bad)
    code, err = run_train(tmp_path, with_data(base, bad), capsys=capsys)
    assert code == 2 and f"{bad} row 1, field 'prompt'" in err


def test_the_command_line_exits_2_fast_without_a_traceback_or_ray(base, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(base[0])))
    t0 = time.time()
    command = [sys.executable, "-m", "launch.cli", "train", str(path), "learner.lrr=1"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    assert "did you mean learner.lr?" in out.stderr and "Traceback" not in out.stderr
    assert "Ray" not in out.stderr + out.stdout  # nothing was started
    assert time.time() - t0 < 60
    debug = subprocess.run([*command, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_fresh_run_into_another_runs_directory_is_refused(base, tmp_path, capsys):
    """resume=never never mixes two runs' records: the directory is left as it was."""
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    code, err = run_train(tmp_path, base[0], f"trainer.output_dir={run_dir}", "trainer.resume=never",
                          capsys=capsys)
    assert code == 2 and f"trainer.output_dir={run_dir} already holds a run (metrics.jsonl)" in err
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "kind": "train"}\n'
