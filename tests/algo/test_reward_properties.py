"""Property tests (hypothesis) of the verifier's scoring over what a model can emit: empty text,
bytes decoded as text, unterminated or nested tags, pathological LaTeX inside <answer>. Whatever it
is given, `verify` returns a well-formed verdict (no exception, reward in its range, `passed`
consistent with the reward), and a response with the exact answer in well-formed tags always scores."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrl.algo.reward import FORMAT_WEIGHT, verify

TAGS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<answer><answer>",
                        "</answer></answer>"])
LATEX = st.sampled_from([r"\frac{", "}", "{", r"\sqrt", "^", "_", r"\left(", r"\right)", r"\int", "$", "\\",
                         r"\begin{matrix}", "&", "1", "x", "10^{10^{10}}", "e", r"\pi", " ", ","])
PIECES = st.one_of(st.text(max_size=12), TAGS, LATEX,
                   st.binary(max_size=12).map(lambda b: b.decode("utf-8", errors="replace")))
OUTPUTS = st.lists(PIECES, max_size=25).map("".join)
ANSWERS = st.one_of(st.integers(-1000, 1000).map(str),
                    st.sampled_from([r"\frac{1}{2}", "A", "(C)", r"\sqrt{2}"]),
                    st.text(alphabet=string.digits + "./-", min_size=1, max_size=6))

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def well_formed(v) -> bool:
    return (v.accuracy in (0.0, 1.0) and v.reward == v.accuracy + FORMAT_WEIGHT * float(v.format_ok)
            and v.passed == (v.reward > 0.1))


@FAST
@given(OUTPUTS, ANSWERS)
def test_any_output_gets_a_well_formed_verdict(response, answer):
    assert well_formed(verify(response, answer, timeout_s=1))


@FAST
@given(st.text(max_size=40).filter(lambda t: "<" not in t and ">" not in t), ANSWERS)
def test_the_exact_answer_in_tags_always_scores(thought, answer):
    v = verify(f"<think>{thought}</think><answer>{answer}</answer>", answer, timeout_s=1)
    assert v.accuracy == 1.0 and v.passed


@FAST
@given(st.sampled_from(["", " ", "<answer>", "<answer>5", "</answer>5<answer>", "<answer></answer>"]),
       ANSWERS)
def test_empty_and_unterminated_answers_score_zero_accuracy(response, answer):
    v = verify(response, answer, timeout_s=1)
    assert v.accuracy == 0.0 and well_formed(v)


@settings(max_examples=20, deadline=None)
@given(st.integers(60, 400))
def test_deeply_nested_latex_is_refused_not_parsed(depth):
    """Nesting past max_nesting is scored 0 at once (sympy would take seconds or recurse too deep)."""
    v = verify("<think>x</think><answer>" + r"\frac{1}{" * depth + "2" + "}" * depth + "</answer>", "1")
    assert v.accuracy == 0.0 and v.format_ok
