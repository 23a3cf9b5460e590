"""Learner -> rollout weight sync end to end: DeepSpeed learners train a couple of steps, then
`ShmWeightSync.push` gathers their weights and reloads them in a live vLLM engine, which then
serves exactly those weights (greedy tokens and log-probs equal transformers' on the exported
file), for the text and the vision-language tiny model, one rank and (text) two ZeRO-3 ranks."""

import pytest
import ray
import torch

from actors.group import ActorGroup, named_actor
from actors.learner import Learner
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.weight_sync import ShmWeightSync
from calibrl.algo import CalibrationStage, ExpertTrajectory, Group, Verdict
from calibrl.data.synthetic import generate_examples

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def rollout_worker(ray_local, tiny_models):
    """One engine per model for the whole module, with its greedy output on the initial weights."""
    workers = {}

    def get(which: str):
        if which not in workers:
            worker = named_actor(RolloutWorker, f"rollout-sync-{which}", num_cpus=1,
                                 model_path=tiny_models[which], kv_cache_memory_mib=32, max_model_len=512)
            workers[which] = worker, ray.get(worker.generate.remote(requests_for(which), GREEDY))
        return workers[which]

    yield get
    for worker, _ in workers.values():
        ray.kill(worker)


def requests_for(which: str, n: int = 2, seed: int = 3) -> list[RolloutRequest]:
    ex = generate_examples(n, seed=seed, split="test", multimodal=which.endswith("vl"))
    return [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images)) for e in ex]


def sft_batch(worker, which: str, tokenizer, seed: int):
    """Prompts sampled through the engine (its expanded prompt ids, images kept with the group),
    each group with its synthetic expert trajectory as the SFT target."""
    ex = generate_examples(4, seed=seed, split="train", multimodal=which.endswith("vl"))
    requests = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images), seed=seed) for e in ex]
    results = ray.get(worker.generate.remote(requests, SamplingSpec(n=2, temperature=1.0, max_tokens=6)))
    stage = CalibrationStage(pad_token_id=tokenizer.pad_token_id, mixup="always")
    for e, r in zip(ex, results):
        expert = tokenizer(e.experts[0], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        stage.add(Group(prompt_id=e.id, prompt_token_ids=r.prompt_token_ids, answer=e.answer,
                        responses=r.samples,
                        verdicts=[Verdict(reward=0.0, accuracy=0.0, format_ok=False,
                                          passed=False)] * len(r.samples),
                        experts=[ExpertTrajectory(token_ids=expert, text=e.experts[0])],
                        images=list(e.images)))
    return stage.assemble()[0]


def transformers_reference(model_path: str, weights_file: str, result, images: list[bytes]):
    """transformers on the exported weights: its greedy continuation of the engine's prompt ids
    (as long as the engine's) and its log-probs of the engine's tokens."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText

    from calibrl.inputs import image_tensors
    from calibrl.modeling import response_logprobs, vl_forward_kwargs

    vl = bool(images)
    model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(
        model_path, dtype=torch.float32).eval()
    model.load_state_dict(load_file(weights_file), strict=True)  # the export holds every parameter
    vis = image_tensors(AutoImageProcessor.from_pretrained(model_path), images) if vl else {}
    prompt = torch.tensor([result.prompt_token_ids])
    tokens = torch.tensor(result.samples[0].token_ids).unsqueeze(0)
    with torch.no_grad():
        greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **vis,
                                **vl_forward_kwargs(model, prompt, prompt.shape[1]),
                                max_new_tokens=tokens.shape[1], do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        logp, _ = response_logprobs(model, prompt, torch.ones_like(prompt), tokens, torch.ones_like(tokens),
                                    **vis)
    return greedy[0, prompt.shape[1]:], logp[0]


# the vision-language model on one ZeRO-2 rank; 2 ZeRO-3 ranks and the text model go through the
# transfer API in tests/actors/test_weight_transfer.py, and the shm export under ZeRO-3 (each rank
# writes its partitions) is checked against the gathered weights in tests/actors/test_learner.py
CASES = [("tiny-qwen2.5-vl", 1, 2)]


@pytest.mark.parametrize("which,ranks,stage", CASES, ids=["vl-1rank-zero2"])
def test_trained_weights_reach_the_engine(ray_local, tiny_models, rollout_worker, which, ranks, stage):
    from transformers import AutoTokenizer

    version = CASES.index((which, ranks, stage)) + 1
    path = tiny_models[which]
    worker, initial = rollout_worker(which)
    learners = ActorGroup(Learner, ranks, name_prefix=f"learner-sync-{version}", num_cpus_per_actor=1,
                          model_path=path, zero_stage=stage, lr=2e-4, micro_batch_per_device=4)
    sync = ShmWeightSync(learners, [worker])
    try:
        batch = sft_batch(worker, which, AutoTokenizer.from_pretrained(path), seed=version)
        for _ in range(2):
            ray.get(learners.run("train_step", batch, loss_name="sft", loss_kwargs={"agg": "token-mean"}))
        timings = sync.push(version)
        assert timings["time/sync_s"] > 0

        assert ray.get(worker.info.remote())["weights_version"] == version
        requests = requests_for(which)
        served = ray.get(worker.generate.remote(requests, GREEDY))
        assert [r.samples[0].weights_version for r in served] == [version] * len(requests)
        # the engine no longer serves the initial weights
        assert any(list(a.samples[0].token_ids) != list(b.samples[0].token_ids)
                   for a, b in zip(served, initial))
        for request, result in zip(requests, served):
            greedy, logp = transformers_reference(path, f"{sync.root}/v{version}/model.safetensors", result,
                                                  request.images)
            assert greedy.tolist() == list(result.samples[0].token_ids)
            diff = (logp - torch.tensor(result.samples[0].logprobs)).abs().max().item()
            assert diff <= 1e-4, diff
    finally:
        sync.close()
        learners.shutdown()
