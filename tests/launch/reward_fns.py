"""Reward functions for driver tests (named by import path in `verifier.reward_function`)."""


def odd_answers_only(response: str, answer: str) -> float:
    """Prompts with an even answer always fail (uninformative groups); odd ones pass on odd-length
    responses (informative groups): a deterministic mix for the dynamic-sampling test."""
    return 1.0 if int(answer) % 2 == 1 and len(response) % 2 == 1 else 0.0


def odd_length(response: str, answer: str) -> float:
    """Passes about half of a random model's responses: gives every group a learning signal."""
    return 1.0 if len(response) % 2 == 1 else 0.0
