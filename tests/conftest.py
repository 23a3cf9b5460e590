"""Shared fixtures: tiny models built locally once per session, and a local Ray cluster."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """{'tiny-qwen2': path, 'tiny-qwen2.5-vl': path}, random init, saved with save_pretrained."""
    from calibrl.tiny_models import make_all

    return make_all(str(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the session (logical CPUs exceed the 2 real cores on purpose:
    actors here are mostly idle while another one works)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
