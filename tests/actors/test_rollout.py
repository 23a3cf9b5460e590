"""The vLLM rollout worker inside a Ray actor: sampling outputs, in-place weight updates, and
agreement with transformers on the same weights (text and vision-language tiny models)."""

import os
import shutil

import pytest
import torch

from actors.group import named_actor
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.weight_files import link_model_files
from calibrl.modeling import vl_forward_kwargs

pytestmark = pytest.mark.slow


def hf_model(path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from actors.rollout import is_vision_language

    cls = AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(model, image_processor, result, images):
    """transformers' log-probs of each sample of `result`, on the prompt ids vLLM used."""
    from calibrl.inputs import image_tensors
    from calibrl.modeling import response_logprobs

    vis = image_tensors(image_processor, images) if images else {}
    out = []
    for s in result.samples:
        p = torch.tensor([result.prompt_token_ids])
        r = torch.as_tensor(s.token_ids)[None]
        with torch.no_grad():
            lp, _ = response_logprobs(model, p, torch.ones_like(p), r, torch.ones_like(r), **vis)
        out.append(lp[0])
    return out


def perturbed_state_dict(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["tiny-qwen2.5-vl"])  # the text model's path is a subset of it
def test_update_in_place_then_match_transformers(ray_local, tiny_models, tmp_path, which):
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor

    from calibrl.data.synthetic import generate_examples

    path = tiny_models[which]
    vl = which.endswith("vl")
    ex = generate_examples(2, seed=3, split="test", multimodal=vl)
    requests = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images), seed=7) for e in ex]
    worker = named_actor(RolloutWorker, f"rollout-test-{which}", num_cpus=1, model_path=path,
                         kv_cache_memory_mib=64, max_model_len=1024)
    import ray

    sampled = ray.get(worker.generate.remote(requests, SamplingSpec(n=3, temperature=1.0, max_tokens=10)))
    assert [len(r.samples) for r in sampled] == [3, 3]
    for r in sampled:
        for s in r.samples:
            assert len(s.token_ids) == len(s.logprobs) > 0 and s.weights_version == 0
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.finish_reason in ("length", "stop")

    model = hf_model(path)
    proc = AutoImageProcessor.from_pretrained(path) if vl else None
    greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=12)
    before = ray.get(worker.generate.remote(requests[:1], greedy))[0]

    sd = perturbed_state_dict(model)
    shm = f"/dev/shm/calibrl-test-{os.getpid()}-{which}"
    os.makedirs(shm, exist_ok=True)
    save_file(sd, f"{shm}/model.safetensors")
    link_model_files(path, shm)
    ray.get(worker.load_weights_from_path.remote(5, shm))
    after = ray.get(worker.generate.remote(requests[:1], greedy))[0]
    assert after.samples[0].weights_version == 5
    # the engine serves the new weights
    assert list(after.samples[0].token_ids) != list(before.samples[0].token_ids)

    # greedy tokens equal transformers' argmax path, log-probs within 1e-4 (fp32)
    hf_lp = hf_logprobs(model, proc, after, requests[0].images)[0]
    assert torch.allclose(hf_lp, torch.tensor(after.samples[0].logprobs), atol=1e-4), (
        (hf_lp - torch.tensor(after.samples[0].logprobs)).abs().max())
    from calibrl.inputs import image_tensors
    ids = torch.tensor([after.prompt_token_ids])
    vis = image_tensors(proc, requests[0].images) if vl else {}
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **vis,
                             **vl_forward_kwargs(model, ids, ids.shape[1]), max_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    n = len(after.samples[0].token_ids)
    assert gen[0, ids.shape[1]:ids.shape[1] + n].tolist() == after.samples[0].token_ids.tolist()
    ray.kill(worker)
    shutil.rmtree(shm, ignore_errors=True)
