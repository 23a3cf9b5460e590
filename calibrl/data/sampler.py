"""The seeded, resumable prompt sampler: endless batches of prompts, restorable from a checkpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """An endless, seeded stream of batches of `prompts_per_step` items, resumable from `state_dict()`.

    Epoch e visits every item once in the order `default_rng([seed, e]).permutation(n)` (or in file
    order with shuffle=False). Batches are cut from the concatenation of epochs: a batch that
    reaches the end of an epoch is completed from the start of the next one, so no item is dropped
    and a batch is never empty (with prompts_per_step > n a batch spans several epochs and repeats
    items). The state is (epoch, position in that epoch's order); a sampler restored from it draws
    exactly the batches the original would have drawn next.
    """

    def __init__(self, items: Sequence[T], prompts_per_step: int, *, seed: int, shuffle: bool = True):
        if len(items) == 0:
            raise ValueError("PromptSampler needs at least one example")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={prompts_per_step} must be >= 1")
        self.items = items
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into `items` in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            n = len(self.items)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.prompts_per_step:
            order = self.epoch_order(self.epoch)
            take = order[self.position:self.position + self.prompts_per_step - len(indices)]
            indices.extend(int(i) for i in take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_batch(self) -> list[T]:
        return [self.items[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_examples": len(self.items),
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position). The data, seed and shuffle flag must be those of the saved run."""
        mine = self.state_dict()
        for key in ("num_examples", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                                 f"{key}={mine[key]!r}: resuming would not draw the same prompts")
        if not 0 <= state["position"] <= len(self.items) or state["epoch"] < 0:
            raise ValueError(f"sampler state epoch={state['epoch']} position={state['position']} is out of "
                             f"range for {len(self.items)} examples")
        self.epoch, self.position = state["epoch"], state["position"]
        if self.position == len(self.items):
            self.epoch, self.position = self.epoch + 1, 0
