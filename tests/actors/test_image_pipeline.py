"""One image pipeline: the configured `image_min_pixels` / `image_max_pixels` reach vLLM, the
driver's prompt ids and the learner's image processor alike. With a limit below the checkpoint's
default (the 7B recipe's 1003520 against Qwen2.5-VL's 12845056; here 6272 against the tiny
checkpoint's 12544) and an image above both, all three count the same image tokens and the
learner's log-probs of the engine's samples match the engine's."""

import io

import pytest
import ray
from PIL import Image

from actors.group import ActorGroup, named_actor
from actors.learner import Learner, gather_rank_rows
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from calibrl.algo import CalibrationStage, Group, Verdict
from calibrl.inputs import IMAGE_PAD, prompt_token_ids
from calibrl.tiny_models import build_tokenizer

pytestmark = pytest.mark.slow

PIXELS = {"image_min_pixels": 28 * 28 * 4, "image_max_pixels": 28 * 28 * 8}


def big_image() -> bytes:
    img = Image.new("RGB", (300, 200), (30, 120, 200))
    for x in range(0, 300, 20):
        img.paste((250, 250, 0), (x, 50, x + 10, 150))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_learner_engine_and_driver_count_the_same_image_tokens(ray_local, tiny_models):
    from transformers import AutoImageProcessor

    path = tiny_models["tiny-qwen2.5-vl"]
    default = AutoImageProcessor.from_pretrained(path).size["longest_edge"]
    assert PIXELS["image_max_pixels"] < default < 300 * 200  # the case the checkpoint's defaults get wrong

    tokenizer = build_tokenizer()
    image = big_image()
    prompt = "<image>How many yellow bars are there?"
    worker = named_actor(RolloutWorker, "rollout-pixels", num_cpus=1, model_path=path, kv_cache_memory_mib=32,
                         max_model_len=512, **PIXELS)
    learners = ActorGroup(Learner, 1, name_prefix="learner-pixels", num_cpus_per_actor=1, model_path=path,
                          **PIXELS)
    try:
        result = ray.get(worker.generate.remote([RolloutRequest(prompt_id="p", prompt=prompt, images=[image],
                                                                seed=0)],
                                                SamplingSpec(n=2, temperature=1.0, max_tokens=8)))[0]
        pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        engine_count = result.prompt_token_ids.count(pad)
        driver_ids = prompt_token_ids(tokenizer, prompt, [image], min_pixels=PIXELS["image_min_pixels"],
                                      max_pixels=PIXELS["image_max_pixels"])
        assert driver_ids == result.prompt_token_ids
        # 300 x 200 scaled by sqrt(60000 / 6272) and floored to multiples of 28: 84 x 56 px, a 3 x 2 grid
        # of merged 28-px patches (the checkpoint default, 12544, would give 112 x 84: 12 tokens)
        assert engine_count == 6

        stage = CalibrationStage(pad_token_id=tokenizer.pad_token_id, mixup="never")
        stage.add(Group(prompt_id="p", prompt_token_ids=result.prompt_token_ids, answer="15",
                        responses=result.samples,
                        verdicts=[Verdict(reward=float(i), accuracy=float(i), format_ok=True, passed=bool(i))
                                  for i in range(len(result.samples))],
                        experts=[], images=[image]))
        batch, _ = stage.assemble()
        logp = gather_rank_rows(ray.get(learners.run("compute_logprobs", batch)), "logp",
                                tuple(batch.response_ids.shape))
        gap = float((logp - batch.rollout_logp)[batch.response_mask].abs().max())
        assert gap <= 1e-3, gap
    finally:
        learners.shutdown()
        ray.kill(worker)
