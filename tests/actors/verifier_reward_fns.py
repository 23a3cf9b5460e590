"""Reward functions for tests/actors/test_verifier.py, named by import path as `verifier.reward_function`
(`tests.actors.verifier_reward_fns:...`: importable from the repository root, where tests run)."""

import os
import time

from calibrl.algo.reward import Verdict


def misbehaving(response: str, answer: str):
    """1.0 for the exact answer, 0.05 for "HALF" (below the pass threshold), a Verdict for "VERDICT";
    hangs on "HANG", raises on "BOOM", kills its process on "DIE", returns a string on "JUNK"."""
    if "HANG" in response:
        time.sleep(3600)
    if "BOOM" in response:
        raise RuntimeError("boom")
    if "DIE" in response:
        os._exit(3)
    if "HALF" in response:
        return 0.05
    if "VERDICT" in response:
        return Verdict(reward=0.7, accuracy=0.5, format_ok=True, passed=True)
    if "JUNK" in response:
        return "not a number"
    return 1.0 if response.strip() == answer else 0.0

