import pytest

from calibrl.config import Config, ConfigError, load_config, validate


def test_defaults_validate():
    cfg = validate(Config())
    assert cfg.algorithm.name == "calibrl"


def test_yaml_then_cli_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algorithm:\n  name: grpo\n  alpha: 0.25\ntrainer:\n  total_steps: 7\n")
    cfg = load_config(str(y), ["trainer.total_steps=9", "data.train_files=[a.parquet,b.parquet]"])
    assert cfg.algorithm.name == "grpo"          # from YAML
    assert cfg.algorithm.alpha == 0.25           # from YAML
    assert cfg.trainer.total_steps == 9          # CLI beats YAML
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.algorithm.clip_ratio_c == 3.0     # dataclass default untouched


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(Exception, match="not_a_field"):
        load_config(None, ["trainer.not_a_field=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(Exception, match="total_steps"):
        load_config(None, ["trainer.total_steps=lots"])


@pytest.mark.parametrize("override, fragment", [
    ("algorithm.name=ppo_magic", "algorithm.name='ppo_magic' is unknown"),
    ("learner.micro_batch_per_device=3", "micro_batch_per_device=3 does not divide"),
    ("learner.mini_batch_prompts=3", "mini_batch_prompts=3 does not divide"),
    ("rollout.samples_per_prompt=1", "group advantages need >= 2 samples"),
    ("rollout.max_response_length=4096", "exceeds model.max_model_len"),
    ("algorithm.loss_agg=sum", "loss_agg='sum' is unknown"),
    ("data.on_bad_row=ignore", "data.on_bad_row='ignore'"),
    ("learner.pad_to_multiple_of=0", "learner.pad_to_multiple_of=0 must be >= 1"),
])
def test_validate_names_each_problem(override, fragment):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert fragment in str(e.value)


def test_validate_reports_all_problems_at_once():
    cfg = load_config(None, ["algorithm.name=nope", "rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert len(e.value.problems) >= 2


def test_validate_checks_model_context(tiny_models):
    cfg = load_config(None, [f"model.path={tiny_models['tiny-qwen2']}", "model.max_model_len=4096",
                             "data.max_prompt_length=512"])
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        validate(cfg)


def test_sft_allows_single_sample():
    validate(load_config(None, ["algorithm.name=sft", "rollout.samples_per_prompt=1",
                                "learner.micro_batch_per_device=1"]))


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/**/*.yaml", recursive=True)))
def test_every_shipped_config_loads_and_validates(path):
    overlays = [path] if "baselines" not in path else ["configs/cpu_demo.yaml", path]
    validate(load_config(overlays))


def test_every_baseline_and_ablation_overlay_is_a_valid_demo_config():
    import glob

    from calibrl.algo import METHODS

    paths = sorted(glob.glob("configs/baselines/*.yaml") + glob.glob("configs/ablations/*.yaml"))
    assert len(paths) >= 12
    for path in paths:
        cfg = validate(load_config(["configs/cpu_demo.yaml", path]))
        assert cfg.algorithm.name in METHODS, path
