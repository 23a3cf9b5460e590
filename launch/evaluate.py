"""Evaluation on held-out prompts: greedy accuracy, pass@k with sampling, format rate, mean
response length, each overall and per `data_source`.

Used by the trainer every `trainer.eval_every_steps` and at the end, and by
`calibrl eval CHECKPOINT_OR_MODEL --data FILE.parquet ...` on any parquet.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import ray

from actors.rollout import RolloutRequest, SamplingSpec
from calibrl.data.schema import Example

CHUNK_PROMPTS = 32
"""Prompts per generation request: the unit of progress, and of work spread over the workers."""


def _generate(workers: list, examples: list[Example], sampling: SamplingSpec, seed: int,
              on_progress: Callable[[int], None] | None = None, timeout: float | None = None) -> list:
    """Results in example order; chunks of the examples go to the workers round robin, and
    `on_progress(prompts)` is called as each chunk completes. No chunk in `timeout` seconds:
    TimeoutError."""
    refs, sizes = [], {}
    for k, start in enumerate(range(0, len(examples), CHUNK_PROMPTS)):
        reqs = [RolloutRequest(prompt_id=e.id, prompt=e.prompt, images=list(e.images), seed=seed + start + j)
                for j, e in enumerate(examples[start:start + CHUNK_PROMPTS])]
        refs.append(workers[k % len(workers)].generate.remote(reqs, sampling))
        sizes[refs[-1]] = len(reqs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
            raise TimeoutError(f"no rollout engine returned an evaluation chunk within {timeout:.0f} s")
        if on_progress:
            on_progress(sizes[done[0]])
    return [r for part in ray.get(refs) for r in part]


def evaluate(workers: list, verifiers, examples: list[Example], *, pass_k: int, temperature: float,
             max_tokens: int, seed: int = 0, on_progress: Callable[[int], None] | None = None,
             timeout: float | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, {prompt id: (greedy response text, its accuracy)}). `on_progress(prompts)` counts
    the prompts generated (greedy, then sampled: 2 x len(examples) in all when pass_k > 0). Each wait
    on an engine or on the verifiers is bounded by `timeout` (TimeoutError)."""
    if not examples:
        return {}, {}
    greedy = _generate(workers, examples, SamplingSpec(n=1, temperature=0.0, max_tokens=max_tokens), seed,
                       on_progress, timeout)
    sampled = (_generate(workers, examples,
                         SamplingSpec(n=pass_k, temperature=temperature, max_tokens=max_tokens),
                         seed + 7919, on_progress, timeout) if pass_k > 0 else [])
    texts = [r.samples[0].text for r in greedy] + [s.text for r in sampled for s in r.samples]
    answers = ([e.answer for e in examples]
               + [e.answer for e in examples for _ in range(pass_k if sampled else 0)])
    verdicts, _ = verifiers.score(texts, answers, timeout=timeout)
    n = len(examples)
    greedy_v, sampled_v = verdicts[:n], verdicts[n:]

    by_source: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_source[e.data_source].append(i)

    def summary(idx: list[int], suffix: str = "") -> dict[str, float]:
        m = {f"val/accuracy{suffix}": sum(greedy_v[i].accuracy for i in idx) / len(idx),
             f"val/format_rate{suffix}": sum(greedy_v[i].format_ok for i in idx) / len(idx),
             f"val/response_length{suffix}": sum(len(greedy[i].samples[0].token_ids) for i in idx) / len(idx)}
        if sampled_v:
            m[f"val/pass_at_k{suffix}"] = sum(any(v.passed for v in sampled_v[i * pass_k:(i + 1) * pass_k])
                                              for i in idx) / len(idx)
        return m

    out = summary(list(range(n)))
    out["val/prompts"] = n
    if len(by_source) > 1:
        for source, idx in sorted(by_source.items()):
            out |= summary(idx, "/" + source.replace("/", "_"))
    return out, {e.id: (r.samples[0].text, v.accuracy) for e, r, v in zip(examples, greedy, greedy_v)}
