"""Section 1 of docs/algorithm.md: the verifiable reward r = acc + 0.1 * fmt.

`verify(response, answer)` returns a `Verdict`. Format: the stripped response must match
`^<think>.*?</think>.*?<answer>.*?</answer>$` (dot matches newlines). Accuracy: the text inside the
last `<answer>...</answer>` is compared with the ground truth, in this order:

1. multiple choice: when the ground truth is a single capital letter ("B", "(B)", "B."), the
   prediction's leading letter is compared with it ("b", "(B)", "B. 45 degrees", "Option B");
2. string equality after normalisation (whitespace, `\\dfrac`/`\\tfrac` -> `\\frac`, `\\text{..}`,
   `\\left`/`\\right`, `$`, `%`, degrees, trailing units after a number, case);
3. symbolic equivalence with math-verify, LaTeX extraction only.

Departures from the paper / reference code, and why:
- No `<answer>` tags means accuracy 0 (the spec reads "the text inside <answer>"); some reference
  rewards fall back to the whole response, which rewards untagged answers.
- math-verify's plain-expression extractor parses with sympy's `parse_expr`, which `eval`s its
  input; model output must never be evaluated, so only the LaTeX extractor (a real parser) is used,
  on the answer wrapped in `$...$`. Plain "0.5" or "1/2" still parse there.
- The answer is the text between the last `<answer>` and the last `</answer>` (found with
  `rfind`, linear time), and the format check is a linear scan equivalent to the regex.
- Bounded time: an answer longer than `max_answer_chars` or nested deeper than `max_nesting`
  gets accuracy 0 without calling the checker, and math-verify's own timeout (a SIGALRM) bounds
  the rest. SIGALRM only works in the main thread, so elsewhere (a threaded verifier) the
  checker runs without it and the two caps above are the bound.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

FORMAT_WEIGHT = 0.1
FORMAT_RE = re.compile(r"^<think>.*?</think>.*?<answer>.*?</answer>$", re.DOTALL)
GOLD_LETTER_RE = re.compile(r"^\(?([A-Z])\)?\.?$")
PRED_LETTER_RE = re.compile(r"^(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Za-z])\)?(?=$|[\s.:,)])",
                            re.IGNORECASE)

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\bdegrees?\b")
_UNIT_RE = re.compile(
    r"(?<=\d)\s*(?:cm|mm|km|m|kg|g|mg|s|sec|seconds?|min|minutes?|h|hours?|units?|inches|inch|in|"
    r"feet|foot|ft|meters?|metres?|cm\^2|m\^2|cm\^3|m\^3|dollars?|yuan|l|ml)\s*$",
    re.IGNORECASE,
)
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one response (section 1)."""

    reward: float
    """acc + 0.1 * fmt, in {0, 0.1, 1, 1.1}."""
    accuracy: float
    """1.0 when the answer matches the ground truth, else 0.0."""
    format_ok: bool
    """The response matches <think>..</think>..<answer>..</answer>."""
    passed: bool
    """reward > pass_threshold (a format-only response fails)."""


def normalize_answer(text: str) -> str:
    """String normalisation of an answer before the exact comparison (not used for math-verify)."""
    s = text.strip().strip("$").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    for _ in range(3):  # \text{\textbf{x}}: unwrap a few levels
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("$", "")
    s = _UNIT_RE.sub("", s.strip())
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def format_matches(text: str) -> bool:
    """`FORMAT_RE.match(text)` in linear time: the regex backtracks cubically on inputs full of tags.

    Taking the earliest `</think>` and then the earliest `<answer>` after it is optimal, because the
    `.*?` gaps accept anything.
    """
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return False
    think_end = text.find("</think>", len("<think>"))
    if think_end < 0:
        return False
    # an <answer> found here cannot overlap the closing </answer> (no suffix of one is a prefix of the other)
    return text.find("<answer>", think_end + len("</think>")) >= 0


def _nesting_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    return deepest


def _symbolic_equal(pred: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import LatexExtractionConfig, parse
    from math_verify import verify as mv_verify

    config = [LatexExtractionConfig()]
    try:
        gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout_s)
        pred_parsed = parse(f"${pred}$", extraction_config=config, parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except Exception:  # noqa: BLE001
        # math-verify raises many kinds on malformed input and on timeout: not equal
        return False


def answer_accuracy(pred: str, gold: str, *, max_answer_chars: int = 1000, max_nesting: int = 50,
                    timeout_s: int = 3) -> float:
    """1.0 if the predicted answer text matches the ground truth (see module docstring), else 0.0."""
    pred, gold = pred.strip(), gold.strip()
    if not pred or len(pred) > max_answer_chars or _nesting_depth(pred) > max_nesting:
        return 0.0
    gold_letter = GOLD_LETTER_RE.match(gold)
    if gold_letter:
        pred_letter = PRED_LETTER_RE.match(_TEXT_CMD_RE.sub(r"\1", pred).strip("$ "))
        return float(pred_letter is not None and pred_letter.group(1).upper() == gold_letter.group(1))
    if normalize_answer(pred) == normalize_answer(gold):
        return 1.0
    in_main_thread = threading.current_thread() is threading.main_thread()
    return float(_symbolic_equal(pred.strip("$"), gold.strip("$"), timeout_s if in_main_thread else None))


def verify(response: str, answer: str, *, pass_threshold: float = 0.1, max_answer_chars: int = 1000,
           max_nesting: int = 50, timeout_s: int = 3) -> Verdict:
    """Score one response against its ground-truth answer (section 1).

    response: the decoded model output; answer: the ground truth. `timeout_s` bounds each math-verify
    call in the main thread (whole seconds, SIGALRM). Never evaluates the response as code.
    """
    text = response.strip()
    format_ok = format_matches(text)
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    accuracy = 0.0
    if start >= 0:
        accuracy = answer_accuracy(text[start + len("<answer>"):end], answer,
                                   max_answer_chars=max_answer_chars, max_nesting=max_nesting,
                                   timeout_s=timeout_s)
    reward = accuracy + FORMAT_WEIGHT * float(format_ok)
    return Verdict(reward=reward, accuracy=accuracy, format_ok=format_ok, passed=reward > pass_threshold)
