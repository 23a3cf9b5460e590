"""The NCCL weight-transfer path (GPU only; skipped without CUDA): a learner on one GPU broadcasts
its weights over vLLM's RL weight-transfer API into an engine on another GPU, which then serves
them (greedy tokens equal transformers' on the learner's weights)."""

import pytest
import ray
import torch

from actors.group import ActorGroup, named_actor
from actors.learner import Learner
from actors.rollout import RolloutRequest, RolloutWorker, SamplingSpec
from actors.weight_sync import TransferWeightSync

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_nccl_broadcast_reaches_the_engine(ray_local, tiny_models):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one learner, one engine")
    path = tiny_models["tiny-qwen2"]
    worker = named_actor(RolloutWorker, "rollout-nccl-0", num_cpus=1, num_gpus=1, model_path=path,
                         dtype="bfloat16", weight_sync="nccl", max_model_len=512)
    learners = ActorGroup(Learner, 1, name_prefix="learner-nccl", num_cpus_per_actor=1, num_gpus_per_actor=1,
                          model_path=path, lr=1e-2)
    try:
        request = [RolloutRequest(prompt_id="p", prompt="Count to five:")]
        greedy = SamplingSpec(n=1, temperature=0.0, max_tokens=8)
        before = ray.get(worker.generate.remote(request, greedy))[0].samples[0].token_ids.tolist()
        # change the learner's weights, then broadcast them
        state = ray.get(learners.run("full_state_dict"))[0]
        sync = TransferWeightSync(learners, [worker], backend="nccl")
        from test_learner import fixed_batch  # same folder: a deterministic batch with experts

        ray.get(learners.run("train_step", fixed_batch(), loss_name="sft", loss_kwargs={"agg": "token-mean"}))
        sync.push(1)
        after = ray.get(worker.generate.remote(request, greedy))[0]
        assert after.samples[0].weights_version == 1
        assert ray.get(worker.info.remote())["weights_version"] == 1
        assert after.samples[0].token_ids.tolist() != before
        new_state = ray.get(learners.run("full_state_dict"))[0]
        assert any(not torch.equal(state[k], new_state[k]) for k in state)
    finally:
        learners.shutdown()
        ray.kill(worker)
