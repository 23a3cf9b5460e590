"""Benchmark rewards (named by import path in `verifier.reward_function`)."""


def odd_length(response: str, answer: str) -> float:
    """Passes about half of a random model's responses, so every group has a learning signal and every
    step takes its updates (with the task's own reward a random model earns nothing, and calibrl skips
    updates that have nothing to learn from)."""
    return 1.0 if len(response) % 2 == 1 else 0.0
