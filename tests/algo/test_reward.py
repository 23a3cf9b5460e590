"""Section 1: the verifier."""

import threading
import time

import pytest

from calibrl.algo import Verdict, verify
from calibrl.algo.reward import FORMAT_RE, format_matches, normalize_answer


def wrap(answer: str) -> str:
    return f"<think>some reasoning</think> <answer>{answer}</answer>"


@pytest.mark.parametrize("pred, gold", [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    ("1/2", "0.5"),
    (r"45^\circ", "45"),
    (r"50\%", "50"),
    (r"\text{5 cm}", "5"),
    ("12 cm", "12"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    ("  7 ", "7"),
    ("x^2 + 2x + 1", "(x+1)^2"),
])
def test_equivalent_answers_pass(pred, gold):
    v = verify(wrap(pred), gold)
    assert v == Verdict(reward=1.1, accuracy=1.0, format_ok=True, passed=True)


@pytest.mark.parametrize("pred, gold, ok", [
    ("B", "B", True), ("(B)", "B", True), ("B.", "B", True), ("b", "B", True), ("B. 45 degrees", "B", True),
    ("Option B", "B", True), (r"\text{B}", "B", True), ("(C)", "B", False), ("C", "(B)", False),
    ("BC", "B", False), ("Because", "B", False),
])
def test_multiple_choice_letters(pred, gold, ok):
    assert verify(wrap(pred), gold).accuracy == float(ok)


def test_wrong_answer_with_format_fails():
    v = verify(wrap("7"), "8")
    assert v == Verdict(reward=0.1, accuracy=0.0, format_ok=True, passed=False)


def test_right_answer_bad_format_still_passes():
    v = verify("<answer>8</answer>", "8")
    assert (v.reward, v.accuracy, v.format_ok, v.passed) == (1.0, 1.0, False, True)


@pytest.mark.parametrize("response", [
    "the answer is 8",                                  # no tags: accuracy 0
    "<think>8</think>",                                 # no answer tag
    "<answer>8</answer><think>x</think>",               # tags out of order: no format
])
def test_bad_format(response):
    v = verify(response, "8")
    assert not v.format_ok
    if "<answer>" not in response:
        assert v.accuracy == 0.0 and not v.passed


def test_pass_threshold():
    assert verify(wrap("7"), "8", pass_threshold=0.05).passed
    assert not verify(wrap("8"), "8", pass_threshold=1.1).passed


@pytest.mark.parametrize("answer", ["{" * 5000 + "}" * 5000, "1+" * 2000 + "1", "(" * 60 + "1" + ")" * 60])
def test_pathological_answers_return_quickly_with_accuracy_zero(answer):
    start = time.perf_counter()
    v = verify(wrap(answer), "1")
    assert time.perf_counter() - start < 0.5
    assert v.accuracy == 0.0 and v.format_ok


def test_pathological_tags_are_linear_time():
    start = time.perf_counter()
    v = verify("<think>" + "</think><answer>" * 5000 + "x", "1")
    assert time.perf_counter() - start < 0.5
    assert not v.format_ok


def test_works_outside_the_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(v=verify(wrap(r"\frac{1}{2}"), "0.5")))
    thread.start()
    thread.join(30)
    assert out["v"].accuracy == 1.0


def test_model_output_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    verify(wrap(payload), "1")
    verify(wrap(f"$ {payload} $"), "1")
    assert not marker.exists()


def test_format_check_matches_the_regex():
    import random
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "x", "\n", " "]
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert format_matches(s) == (FORMAT_RE.match(s) is not None), s


def test_normalize_answer():
    assert normalize_answer(r"$\dfrac{1}{2}$") == normalize_answer(r"\frac{1}{2}")
    assert normalize_answer(r"\text{Yes}") == "yes"
    assert normalize_answer(r"30^{\circ}") == "30"
