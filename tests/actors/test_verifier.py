"""The verifier pool inside Ray: section-1 rewards, custom reward functions, and responses that hang,
raise or kill the scorer (reward 0, counted by reason, the rest of the batch still scored)."""

import time

import pytest
import ray

from actors.verifier import VerifierPool, VerifierWorker
from calibrl.algo.reward import Verdict
from calibrl.config import Config, VerifierConfig

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0
FNS = "tests.actors.verifier_reward_fns"  # importable from the repository root (the Ray workers' cwd)


def fmt(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def pool(ray_local):
    p = VerifierPool.from_config(Config(verifier=VerifierConfig(num_workers=2, timeout_s=TIMEOUT_S)),
                              name_prefix="verifier-test")
    yield p
    p.shutdown()


def test_section1_rewards_in_order_across_workers(pool):
    cases = [
        (fmt("42"), "42", Verdict(1.1, 1.0, True, True)),  # correct, well formatted
        (fmt("41"), "42", Verdict(0.1, 0.0, True, False)),  # format only: fails
        ("<answer>42</answer>", "42", Verdict(1.0, 1.0, False, True)),  # correct, no <think>
        ("42", "42", Verdict(0.0, 0.0, False, False)),  # no tags at all
        (fmt("\\dfrac{1}{2}"), "0.5", Verdict(1.1, 1.0, True, True)),  # symbolic equivalence
        (fmt("(B)"), "B", Verdict(1.1, 1.0, True, True)),  # multiple-choice letter
        (fmt("C"), "B", Verdict(0.1, 0.0, True, False)),
    ]
    verdicts, metrics = pool.score([c[0] for c in cases], [c[1] for c in cases])
    assert verdicts == [c[2] for c in cases]
    assert metrics["scored"] == len(cases) and metrics["timeouts"] == metrics["errors"] == 0
    assert ray.get_actor("verifier-test-0") is not None and ray.get_actor("verifier-test-1") is not None


def test_pathological_response_times_out_and_the_rest_is_scored(pool):
    # sympy tries to build 9^(9^(9^(9^9))): longer than the time limit
    responses = [fmt("9^{9^{9^{9^{9}}}}"), fmt("7"), "<think>" + "<answer>" * 100_000, fmt("7")]
    start = time.monotonic()
    verdicts, metrics = pool.score(responses, ["1", "7", "1", "7"])
    assert time.monotonic() - start < TIMEOUT_S + 8
    assert verdicts[0] == Verdict(0.0, 0.0, False, False)
    assert verdicts[1] == verdicts[3] == Verdict(1.1, 1.0, True, True)
    assert verdicts[2].reward == 0.0
    assert metrics["reasons"] == {"timeout": 1} and metrics["timeouts"] == 1 and metrics["scored"] == 3


def test_custom_reward_function_that_hangs_raises_or_dies(ray_local):
    timeout_s = 1.0  # the function answers in microseconds unless it hangs
    worker = ray.remote(VerifierWorker).options(name="verifier-test-custom", num_cpus=1).remote(
        timeout_s=timeout_s, pass_threshold=0.1, reward_function=f"{FNS}:misbehaving")
    pairs = [("7", "7"), ("HANG", "7"), ("8", "7"), ("BOOM", "7"), ("HALF", "7"), ("DIE", "7"),
             ("VERDICT", "7"), ("JUNK", "7"), ("HANG again", "7"), ("7", "7")]
    ray.get(worker.state.remote())  # wait for the actor (and its scorer) to be up before timing
    start = time.monotonic()
    verdicts, metrics = ray.get(worker.score.remote(pairs))
    elapsed = time.monotonic() - start
    assert elapsed < 2 * timeout_s + 5, elapsed  # two hangs, each bounded by the time limit
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.7, 0.0, 0.0, 1.0]
    assert [v.passed for v in verdicts] == [True] + [False] * 5 + [True, False, False, True]
    assert verdicts[0].accuracy == 1.0 and verdicts[4].accuracy == 0.0  # a float reward: accuracy = passed
    assert verdicts[6] == Verdict(0.7, 0.5, True, True)  # a Verdict is taken as it is
    assert metrics["reasons"] == {"timeout": 2, "error:RuntimeError": 1, "error:ChildDied": 1,
                                  "error:TypeError": 1}
    assert (metrics["scored"], metrics["timeouts"], metrics["errors"], metrics["restarts"]) == (5, 2, 3, 3)
    # the worker keeps going after the bad batch, and its totals add up
    verdicts, metrics = ray.get(worker.score.remote([("7", "7")]))
    assert verdicts[0].reward == 1.0 and metrics["restarts"] == 0
    totals = ray.get(worker.state.remote())
    assert totals["timeouts"] == 2 and totals["reason/error:RuntimeError"] == 1 and totals["scored"] == 6
    ray.kill(worker)


def test_bad_reward_function_path_fails_at_construction():
    with pytest.raises(ValueError, match="module:function"):
        VerifierWorker(reward_function="no_colon_here")
    with pytest.raises(ValueError, match="has no 'missing'"):
        VerifierWorker(reward_function="calibrl.algo.reward:missing")
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierWorker(timeout_s=0)
