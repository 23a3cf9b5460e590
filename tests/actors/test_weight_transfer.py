"""vLLM's weight-transfer API on CPU (the gloo engine pair in actors/gloo_transfer.py), driven by the
same learner and driver code as NCCL on GPU: 2 ZeRO-3 learners train, `TransferWeightSync.push`
moves their weights into 2 live vLLM engines, and each engine then serves exactly the learner's
policy (its sampled tokens' log-probs equal the learner's within 1e-3) under the pushed version."""

import pytest
import ray
import torch

from actors.gloo_transfer import GlooWeightTransferUpdateInfo, buckets
from actors.group import ActorGroup, named_actor
from actors.learner import Learner, gather_rank_rows
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.weight_sync import TransferWeightSync, engine_init_info, transfer_world_size
from calibrl.algo import CalibrationStage, Group, Verdict
from calibrl.data.synthetic import generate_examples
from calibrl.tiny_models import build_tokenizer

pytestmark = pytest.mark.slow


def test_buckets_split_by_bytes_and_keep_order():
    from vllm.distributed.weight_transfer.base import ParamMeta

    meta = [ParamMeta("a", torch.float32, (4,)), ParamMeta("b", torch.float32, (2, 2)),   # 16 B each
            ParamMeta("c", torch.bfloat16, (3,)), ParamMeta("d", torch.float32, (100,))]  # 6 -> 8 B, 400 B
    assert list(buckets(meta, 40)) == [[0, 1, 2], [3]]  # a larger parameter goes alone
    assert list(buckets(meta, 16)) == [[0], [1], [2], [3]]
    info = GlooWeightTransferUpdateInfo(names=["a"], dtype_names=["float32"], shapes=[[4]])
    assert info.names == ["a"]


def test_each_engine_gets_its_own_ranks():
    """vLLM's RayVLLMWeightSyncClient sends one init payload to every engine: two engines would
    both claim rank 1. Engine i starts at rank_offset + i x tensor-parallel size."""
    infos = [engine_init_info({"rank_offset": 1, "world_size": 7}, i, 2) for i in range(3)]
    assert [i["rank_offset"] for i in infos] == [1, 3, 5]
    assert {i["world_size"] for i in infos} == {7}
    assert transfer_world_size(3, 2) == 7  # 1 sender + 3 engines x 2 workers


def sampled_batch(workers, tokenizer, seed: int):
    """Each engine samples the same prompts; one batch of all their responses (rollout log-probs kept)."""
    ex = generate_examples(3, seed=seed, split="train", multimodal=False)
    requests = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, seed=seed) for e in ex]
    per_worker = ray.get([w.generate.remote(requests, SamplingSpec(n=2, temperature=1.0, max_tokens=8))
                          for w in workers])
    stage = CalibrationStage(pad_token_id=tokenizer.pad_token_id, mixup="never")
    for k, results in enumerate(per_worker):
        for e, r in zip(ex, results):
            stage.add(Group(prompt_id=f"{e.id}-w{k}", prompt_token_ids=r.prompt_token_ids, answer=e.answer,
                            responses=r.samples,
                            verdicts=[Verdict(reward=float(i), accuracy=float(i), format_ok=True,
                                              passed=bool(i)) for i in range(len(r.samples))],
                            experts=[]))
    return stage.assemble()[0], per_worker


def test_gloo_transfer_two_learners_two_engines(ray_local, tiny_models):
    path = tiny_models["tiny-qwen2"]
    tokenizer = build_tokenizer()
    workers = [named_actor(RolloutWorker, f"rollout-xfer-{i}", num_cpus=1, model_path=path,
                           kv_cache_memory_mib=32, max_model_len=512, weight_sync="gloo", seed=i)
               for i in range(2)]
    learners = ActorGroup(Learner, 2, name_prefix="learner-xfer", num_cpus_per_actor=1, model_path=path,
                          zero_stage=3, lr=5e-3, micro_batch_per_device=2)
    try:
        sync = TransferWeightSync(learners, workers, backend="gloo")
        batch, _ = sampled_batch(workers, tokenizer, seed=1)
        for _ in range(3):  # move the learners well away from the engines' initial weights
            ray.get(learners.run("train_step", batch, loss_name="grpo",
                                 loss_kwargs={"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"}))

        def gap() -> float:
            fresh, _ = sampled_batch(workers, tokenizer, seed=2)
            logp = gather_rank_rows(ray.get(learners.run("compute_logprobs", fresh)), "logp",
                                    tuple(fresh.response_ids.shape))
            return float((logp - fresh.rollout_logp)[fresh.response_mask].abs().max())

        assert gap() > 1e-2  # before the push the engines serve other weights

        timings = sync.push(7)
        assert timings["time/sync_s"] > 0
        assert [ray.get(w.info.remote())["weights_version"] for w in workers] == [7, 7]
        _, per_worker = sampled_batch(workers, tokenizer, seed=3)
        assert {s.weights_version for results in per_worker for r in results for s in r.samples} == {7}
        assert gap() <= 1e-3

        # a second round on the same group
        ray.get(learners.run("train_step", batch, loss_name="grpo",
                             loss_kwargs={"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"}))
        sync.push(8)
        assert [ray.get(w.info.remote())["weights_version"] for w in workers] == [8, 8]
        assert gap() <= 1e-3
    finally:
        learners.shutdown()
        for w in workers:
            ray.kill(w)
