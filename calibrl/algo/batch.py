"""What flows from rollout to learner: completed groups in, one padded training batch out.

`Response`, `ExpertTrajectory` and `Group` are what the driver hands the calibration stage (one
group per prompt, section "Setting" of docs/algorithm.md); `TrainBatch` is what the learner trains on,
with per-token (B, T) fields kept apart from per-sequence (B,) fields. Row order: each group's
on-policy responses, then its kept experts, group after group.

`attach_expert_logprobs` implements section 4's b_t: once the learner has computed pi_old log-probs
for every row (experts included), each row gets its group's kept expert's log-probs at the same
positions, zero past the expert's end, and their mean over the expert's own length (the
`sequence` baseline). With several experts per group (`algorithm.experts_per_group`), b_t is
their mean over the experts that reach position t, and the sequence baseline the mean of their
means (the paper keeps one expert per group; this is calibrl's extension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from calibrl.algo.reward import Verdict


@dataclass
class Response:
    """One completed on-policy sample from the rollout engine."""

    token_ids: Sequence[int]
    """Response token ids (list or 1-D numpy array; arrays travel through Ray without a copy)."""
    logprobs: Sequence[float]
    """The rollout engine's log-prob of each sampled token, same length as token_ids."""
    text: str
    """Decoded response (what the verifier scored)."""
    finish_reason: str = "stop"
    """`stop` or `length` (truncated at the maximum response length)."""
    weights_version: int = 0
    """Version of the weights that sampled it (staleness accounting)."""


@dataclass
class ExpertTrajectory:
    """An expert chain of thought for the prompt, tokenised with the policy's tokenizer."""

    token_ids: Sequence[int]
    text: str
    source: str = ""
    """Where it came from (dataset column, model name)."""


@dataclass
class Group:
    """One prompt with its n on-policy responses, their verdicts and the prompt's expert trajectories."""

    prompt_id: str
    prompt_token_ids: Sequence[int]
    answer: str
    responses: list[Response]
    verdicts: list[Verdict]
    """verdicts[i] scores responses[i]."""
    experts: list[ExpertTrajectory] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    """Encoded images of the prompt (PNG/JPEG bytes), in prompt order."""


TOKEN_FIELDS = ("response_ids", "response_mask", "rollout_logp", "old_logp", "expert_old_logp")
PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
SEQUENCE_FIELDS = ("rewards", "advantages", "accuracy", "format_ok", "passed", "is_expert", "group_index",
                   "has_expert", "expert_row", "expert_mean_logp", "response_length", "weights_version")
LIST_FIELDS = ("prompt_images", "row_prompt_id")


@dataclass
class TrainBatch:
    """B rows (on-policy responses and kept experts) padded to prompt length P and response length T."""

    # per token, prompt part: (B, P), LEFT-padded
    prompt_ids: Tensor
    """(B, P) long, pad_token_id on the left."""
    prompt_mask: Tensor
    """(B, P) bool, True on real prompt tokens."""
    # per token, response part: (B, T), RIGHT-padded
    response_ids: Tensor
    """(B, T) long, pad_token_id on the right."""
    response_mask: Tensor
    """(B, T) bool, True on real response tokens."""
    rollout_logp: Tensor
    """(B, T) float32: the rollout engine's log-probs (0 on expert rows and padding)."""
    old_logp: Tensor
    """(B, T) float32: the learner's pi_old log-probs; zeros (a read-only broadcast view) until
    `attach_expert_logprobs` sets it."""
    expert_old_logp: Tensor
    """(B, T) float32: b_t, the row's group expert's old log-prob at position t (0 past its end or
    without an expert); filled by `attach_expert_logprobs`."""
    # per sequence: (B,)
    rewards: Tensor
    """(B,) float32: verifier reward (+ overlong penalty); experts get the stage's expert_reward."""
    advantages: Tensor
    """(B,) float32: section 2's group advantage."""
    accuracy: Tensor
    """(B,) float32."""
    format_ok: Tensor
    """(B,) bool."""
    passed: Tensor
    """(B,) bool: reward > pass threshold (the verifier's verdict)."""
    is_expert: Tensor
    """(B,) bool: an expert trajectory row."""
    group_index: Tensor
    """(B,) long: the row's group, 0..G-1 in the assembled batch (kept when split/selected)."""
    has_expert: Tensor
    """(B,) bool: the row's group kept an expert (its rows get the calibration term)."""
    expert_row: Tensor
    """(B,) long: row index of the group's first kept expert in this batch, -1 if none."""
    expert_mean_logp: Tensor
    """(B,) float32: mean old log-prob of the group's expert over its own length (0 if none)."""
    response_length: Tensor
    """(B,) long: number of response tokens."""
    weights_version: Tensor
    """(B,) long: weights version that sampled the row (-1 for experts)."""
    # per row, Python
    prompt_images: list[list[bytes]]
    """Row i's prompt images (rows of one group share the same bytes objects)."""
    row_prompt_id: list[str]
    """Row i's Group.prompt_id."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, indices: Tensor | Sequence[int]) -> TrainBatch:
        """Rows `indices` (1-D long), in that order; expert_row is re-pointed into the new batch
        (-1 where the expert row was not selected)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {name: getattr(self, name)[idx] for name in TOKEN_FIELDS + PROMPT_FIELDS + SEQUENCE_FIELDS}
        idx_list = idx.tolist()
        for name in LIST_FIELDS:
            values = getattr(self, name)
            out[name] = [values[i] for i in idx_list]
        new_pos = torch.full((len(self),), -1, dtype=torch.long)
        new_pos[idx] = torch.arange(idx.numel())
        old = out["expert_row"]
        out["expert_row"] = torch.where(old >= 0, new_pos[old.clamp(min=0)], old)
        return TrainBatch(**out)

    def split(self, n: int) -> list[TrainBatch]:
        """n contiguous pieces of near-equal size (micro-batches or data-parallel shards)."""
        return [self.select(part) for part in torch.tensor_split(torch.arange(len(self)), n)]

    def pad_responses(self, multiple: int) -> TrainBatch:
        """This batch with its response length T padded on the right to a multiple of `multiple`
        (the batch itself if T is one already). The new positions are padding like any other: mask
        False, ids and log-probs 0. Every loss and metric counts masked tokens only, and right padding
        comes after a row's last token, so nothing a row computes changes; a compiled loss runs faster
        on a length it knows to be a multiple of 16 (`compile_loss_kernels(length_multiple=16)`)."""
        extra = -self.response_ids.shape[1] % multiple
        if extra == 0:
            return self
        out = self.to_dict()
        for name in TOKEN_FIELDS:
            out[name] = torch.nn.functional.pad(out[name], (0, extra))
        return TrainBatch(**out)

    def to_dict(self) -> dict[str, Tensor | list]:
        """Field name -> tensor / list, for shipping through Ray; `from_dict` inverts it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Tensor | list]) -> TrainBatch:
        return cls(**data)


def attach_expert_logprobs(batch: TrainBatch, old_logp: Tensor) -> TrainBatch:
    """Set batch.old_logp and build every row's expert baseline from the learner's pi_old log-probs.

    old_logp: (B, T) float32 for ALL rows (experts included), zeros or anything on padding.
    Sets old_logp (masked); expert_old_logp[i] = at each position t, the mean of old_logp over the
    kept experts of row i's group that reach t (zero where none does: one expert gives the
    reference's b_t, zero past its end); expert_mean_logp[i] = the mean over those experts of each
    one's mean over its own length. Rows without an expert get zeros. Modifies and returns `batch`.
    Call it on the assembled batch (or on pieces that keep each group with its experts), then split:
    a piece without its group's expert rows cannot build that group's baseline.
    """
    if bool((batch.has_expert & (batch.expert_row < 0)).any()):
        raise ValueError("some rows' expert row is not in this batch: "
                         "attach expert log-probs before splitting")
    batch.old_logp = old_logp * batch.response_mask
    experts = batch.is_expert
    groups = int(batch.group_index.max()) + 1 if len(batch) else 0
    g = batch.group_index[experts]
    width, dtype = old_logp.shape[-1], old_logp.dtype
    # per group: sum of the experts' log-probs and the number of experts reaching each position
    sums = torch.zeros(groups, width, dtype=dtype).index_add_(0, g, batch.old_logp[experts])
    cover = torch.zeros(groups, width, dtype=dtype).index_add_(0, g, batch.response_mask[experts].to(dtype))
    lengths = batch.response_length[experts].clamp(min=1).to(dtype)
    seq_sums = torch.zeros(groups, dtype=dtype).index_add_(0, g, batch.old_logp[experts].sum(-1) / lengths)
    count = torch.zeros(groups, dtype=dtype).index_add_(0, g, torch.ones_like(lengths))
    with_expert = batch.has_expert.to(dtype)
    batch.expert_old_logp = (sums / cover.clamp(min=1))[batch.group_index] * with_expert.unsqueeze(-1)
    batch.expert_mean_logp = (seq_sums / count.clamp(min=1))[batch.group_index] * with_expert
    return batch
