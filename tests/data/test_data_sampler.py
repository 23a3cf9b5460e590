import json

import pytest

from calibrl.data import PromptSampler


def _draw(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_same_seed_same_batches_other_seed_other_batches():
    items = list(range(50))
    assert _draw(PromptSampler(items, 8, seed=3), 12) == _draw(PromptSampler(items, 8, seed=3), 12)
    assert _draw(PromptSampler(items, 8, seed=3), 12) != _draw(PromptSampler(items, 8, seed=4), 12)


def test_each_epoch_visits_every_item_once_and_reshuffles():
    sampler = PromptSampler(list(range(12)), 4, seed=0)
    epoch0 = [i for batch in _draw(sampler, 3) for i in batch]
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
    epoch1 = [i for batch in _draw(sampler, 3) for i in batch]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_batch_crossing_an_epoch_boundary_continues_into_the_next_epoch():
    sampler = PromptSampler(list(range(10)), 4, seed=1)
    stream = [i for batch in _draw(sampler, 5) for i in batch]  # 20 items = exactly two epochs
    assert all(len(b) == 4 for b in _draw(PromptSampler(list(range(10)), 4, seed=1), 5))
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    tiny = PromptSampler(["a", "b", "c"], 8, seed=0)  # fewer items than a batch: never an empty batch
    batch = tiny.next_batch()
    assert len(batch) == 8 and set(batch) == {"a", "b", "c"}


def test_no_shuffle_keeps_file_order():
    assert (_draw(PromptSampler(list("abcde"), 2, seed=0, shuffle=False), 3)
            == [["a", "b"], ["c", "d"], ["e", "a"]])


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 4, 5, 7])
def test_resume_draws_what_an_uninterrupted_run_draws(stop_after):
    items = [f"p{i}" for i in range(12)]  # 12 / 4: stop_after 3 and 6 sit exactly on epoch boundaries
    uninterrupted = _draw(PromptSampler(items, 4, seed=7), stop_after + 6)
    first = PromptSampler(items, 4, seed=7)
    head = _draw(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PromptSampler(items, 4, seed=7)
    resumed.load_state_dict(state)
    assert head + _draw(resumed, 6) == uninterrupted


def test_resume_at_epoch_boundary_state():
    items = list(range(6))
    sampler = PromptSampler(items, 3, seed=0)
    _draw(sampler, 2)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0
    # a state saved as "end of epoch 0" means the same thing as "start of epoch 1"
    a, b = PromptSampler(items, 3, seed=0), PromptSampler(items, 3, seed=0)
    a.load_state_dict({**sampler.state_dict(), "epoch": 0, "position": 6})
    b.load_state_dict(sampler.state_dict())
    assert _draw(a, 3) == _draw(b, 3) == _draw(sampler, 3)


def test_mismatched_state_and_empty_data_are_errors():
    state = PromptSampler(list(range(5)), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_examples"):
        PromptSampler(list(range(6)), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(list(range(5)), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        PromptSampler([], 2, seed=0)
