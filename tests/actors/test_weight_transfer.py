"""vLLM's weight-transfer API on CPU (the gloo engine pair in actors/gloo_transfer.py), driven by the
same learner and driver code as NCCL on GPU: 2 ZeRO-3 learners train the tiny VL model,
`TransferWeightSync.push` moves their weights into 2 live vLLM engines, and each engine then serves
exactly the learner's policy (its sampled tokens' log-probs equal the learner's within 1e-3) under
the pushed version.

The prompts include an image above both the configured `image_max_pixels` (6272) and the tiny
checkpoint's default (12544): one image pipeline means vLLM, the driver and the learner count the
same image tokens for it (the learner used to follow the checkpoint's default: 12 tokens against
vLLM's 6, and the forward pass failed)."""

import io

import pytest
import ray
import torch
from PIL import Image

from actors.gloo_transfer import buckets
from actors.group import ActorGroup, named_actor
from actors.learner import Learner, gather_rank_rows
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.weight_sync import TransferWeightSync, engine_init_info, transfer_world_size
from calibrl.algo import CalibrationStage, Group, Verdict
from calibrl.data.synthetic import generate_examples
from calibrl.inputs import IMAGE_PAD, prompt_token_ids
from calibrl.tiny_models import build_tokenizer

pytestmark = pytest.mark.slow


def test_buckets_split_by_bytes_and_keep_order():
    from vllm.distributed.weight_transfer.base import ParamMeta

    meta = [ParamMeta("a", torch.float32, (4,)), ParamMeta("b", torch.float32, (2, 2)),   # 16 B each
            ParamMeta("c", torch.bfloat16, (3,)), ParamMeta("d", torch.float32, (100,))]  # 6 -> 8 B, 400 B
    assert list(buckets(meta, 40)) == [[0, 1, 2], [3]]  # a larger parameter goes alone
    assert list(buckets(meta, 16)) == [[0], [1], [2], [3]]


def test_each_engine_gets_its_own_ranks():
    """vLLM's RayVLLMWeightSyncClient sends one init payload to every engine: two engines would
    both claim rank 1. Engine i starts at rank_offset + i x tensor-parallel size."""
    infos = [engine_init_info({"rank_offset": 1, "world_size": 7}, i, 2) for i in range(3)]
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]
    assert {i["world_size"] for i in infos} == {7}
    assert transfer_world_size(3, 2) == 7  # 1 sender + 3 engines x 2 workers


PIXELS = {"image_min_pixels": 28 * 28 * 4, "image_max_pixels": 28 * 28 * 8}
BIG_PROMPT = "<image>How many yellow bars are there?"


def big_image() -> bytes:
    img = Image.new("RGB", (300, 200), (30, 120, 200))
    for x in range(0, 300, 20):
        img.paste((250, 250, 0), (x, 50, x + 10, 150))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sampled_batch(workers, tokenizer, seed: int):
    """Each engine samples the same prompts (two synthetic ones and the big image); one batch of all
    their responses, rollout log-probs kept."""
    ex = generate_examples(2, seed=seed, split="train", multimodal=True)
    prompts = [(e.id, e.prompt, list(e.images), e.answer) for e in ex]
    prompts.append(("big", BIG_PROMPT, [big_image()], "8"))
    requests = [RolloutRequest(prompt_id=i, prompt=p, images=im, seed=seed) for i, p, im, _ in prompts]
    per_worker = ray.get([w.generate.remote(requests, SamplingSpec(n=2, temperature=1.0, max_tokens=8))
                          for w in workers])
    stage = CalibrationStage(pad_token_id=tokenizer.pad_token_id, mixup="never")
    for k, results in enumerate(per_worker):
        for (pid, _, images, answer), r in zip(prompts, results):
            stage.add(Group(prompt_id=f"{pid}-w{k}", prompt_token_ids=r.prompt_token_ids, answer=answer,
                            responses=r.samples,
                            verdicts=[Verdict(reward=float(i), accuracy=float(i), format_ok=True,
                                              passed=bool(i)) for i in range(len(r.samples))],
                            experts=[], images=images))
    return stage.assemble()[0], per_worker


def test_gloo_transfer_two_learners_two_engines(ray_local, tiny_models):
    from transformers import AutoImageProcessor

    path = tiny_models["tiny-qwen2.5-vl"]
    default = AutoImageProcessor.from_pretrained(path).size["longest_edge"]
    assert PIXELS["image_max_pixels"] < default < 300 * 200
    tokenizer = build_tokenizer()
    workers = [named_actor(RolloutWorker, f"rollout-xfer-{i}", num_cpus=1, model_path=path,
                           kv_cache_memory_mib=32, max_model_len=512, weight_sync="gloo", seed=i, **PIXELS)
               for i in range(2)]
    learners = ActorGroup(Learner, 2, name_prefix="learner-xfer", num_cpus_per_actor=1, model_path=path,
                          zero_stage=3, lr=5e-3, micro_batch_per_device=2, **PIXELS)
    try:
        sync = TransferWeightSync(learners, workers, backend="gloo")
        batch, per_worker = sampled_batch(workers, tokenizer, seed=1)

        # one image pipeline: the big image is 6 tokens for vLLM and the driver (300 x 200 scaled by
        # sqrt(60000 / 6272), floored to multiples of 28: 84 x 56 px, 3 x 2 merged 28-px patches)
        big = per_worker[0][-1].prompt_token_ids
        assert big.count(tokenizer.convert_tokens_to_ids(IMAGE_PAD)) == 6
        bounds = {"min_pixels": PIXELS["image_min_pixels"], "max_pixels": PIXELS["image_max_pixels"]}
        assert big == prompt_token_ids(tokenizer, BIG_PROMPT, [big_image()], **bounds)

        def gap() -> float:
            fresh, _ = sampled_batch(workers, tokenizer, seed=2)
            logp = gather_rank_rows(ray.get(learners.run("compute_logprobs", fresh)), "logp",
                                    tuple(fresh.response_ids.shape))
            return float((logp - fresh.rollout_logp)[fresh.response_mask].abs().max())

        assert gap() <= 1e-3  # same initial weights, same image tensors on both sides
        loss = {"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"}
        for _ in range(3):  # move the learners well away from the engines' initial weights
            ray.get(learners.run("train_step", batch, loss_name="grpo", loss_kwargs=loss))
        assert gap() > 1e-2  # before the push the engines serve other weights

        timings = sync.push(7)
        assert timings["time/sync_s"] > 0
        assert [ray.get(w.info.remote())["weights_version"] for w in workers] == [7, 7]
        _, per_worker = sampled_batch(workers, tokenizer, seed=3)
        assert {s.weights_version for results in per_worker for r in results for s in r.samples} == {7}
        assert gap() <= 1e-3

        # a second round over the same group
        ray.get(learners.run("train_step", batch, loss_name="grpo", loss_kwargs=loss))
        sync.push(8)
        assert [ray.get(w.info.remote())["weights_version"] for w in workers] == [8, 8]
        assert gap() <= 1e-3

        # a push that broke off (another engine died mid-transfer) leaves an engine inside an update:
        # the next push closes it and goes through (found by scripts/soak.py)
        ray.get(workers[0].start_weight_update.remote())
        ray.get(learners.run("train_step", batch, loss_name="grpo", loss_kwargs=loss))
        sync.push(9)
        assert [ray.get(w.info.remote())["weights_version"] for w in workers] == [9, 9]
        assert gap() <= 1e-3
    finally:
        learners.shutdown()
        for w in workers:
            ray.kill(w)
