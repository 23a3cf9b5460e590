"""`calibrl compare` for real (tiny runs): one shared SFT warm-up per seed, each variant trained from
it, results written; a second call skips every finished run; an unknown variant is refused first."""

import json
import pathlib

import pytest

from calibrl.data.synthetic import write_splits
from launch.compare import run_compare, variant_overlay
from tests.launch.test_train import overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-data")
    write_splits(str(d), n_train=4, n_val=4, n_test=2, seed=0, multimodal=True, difficulty=(1,))
    return str(d)


def test_variant_overlays_and_unknown_names():
    assert variant_overlay("grpo") == (["configs/baselines/grpo.yaml"], [])
    assert variant_overlay("calibrl") == ([], ["algorithm.name=calibrl"])
    assert variant_overlay("calibrl_relu") == (["configs/ablations/calibrl_relu.yaml"], [])
    with pytest.raises(SystemExit, match="unknown variant 'ppo'"):
        variant_overlay("ppo")


def test_overrides_may_come_before_or_after_the_options(monkeypatch):
    import launch.compare

    calls = []
    monkeypatch.setattr(launch.compare, "run_compare", lambda *a, **kw: calls.append((a, kw)))
    launch.compare.main(["configs/cpu_demo.yaml", "a.b=1", "--variants", "grpo,dapo", "--out", "x", "c.d=2"])
    (configs, overrides), kw = calls[0]
    assert configs == ["configs/cpu_demo.yaml"] and overrides == ["a.b=1", "c.d=2"]
    assert kw == {"variants": ["grpo", "dapo"], "seeds": [0, 1, 2], "out": "x"}


def test_compare_trains_each_variant_from_one_warm_start_and_resumes(ray_local, tiny_models, data_dir,
                                                                       tmp_path, capsys):
    out = tmp_path / "cmp"
    args = overrides(tiny_models, data_dir, "unused", "trainer.total_steps=1", "trainer.sft_warmup_steps=1",
                     "trainer.save_every_steps=0")
    args = [a for a in args if not a.startswith("trainer.output_dir=")]
    path = run_compare([], args, variants=["calibrl", "grpo"], seeds=[0], out=str(out))
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["calibrl/seed0", "grpo/seed0"]
    warm = out / "warmup" / "seed0" / "checkpoints" / "step_000001" / "learner" / "hf"
    for v in ("calibrl", "grpo"):
        cfg = (out / "runs" / v / "seed0" / "checkpoints" / "step_000001" / "config.yaml").read_text()
        assert f"path: {warm}" in cfg  # every variant starts from the shared warm-up
        assert results[f"{v}/seed0"]["steps"] == 1
    table = pathlib.Path(path).read_text()
    assert "| calibrl | 1 |" in table and "| grpo | 1 |" in table
    assert (out / "val_accuracy.png").exists()
    capsys.readouterr()
    run_compare([], args, variants=["calibrl", "grpo"], seeds=[0], out=str(out))  # all done: skipped
    assert capsys.readouterr().err.count("done earlier, skipped") == 3
