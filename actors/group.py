"""A small actor-group helper: N ranks of one class inside a placement group.

`ActorGroup(cls, n, name_prefix="learner")` creates `learner-0 .. learner-{n-1}` (names the Ray
dashboard shows), each reserved in one placement-group bundle, and hands every rank rank 0's
address and a free port so they can form one torch.distributed group. `run(method, *args)`
calls the method on every member and returns the object refs; nothing is waited on or
scattered behind the caller's back.
"""

from __future__ import annotations

import socket
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.logs import capture_output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=0)
def _address_and_port() -> tuple[str, int]:
    return node_address(), free_port()


def _named(cls):
    """`cls` whose instances first send their process's output to `{log_dir}/{name}.log`
    (actors/logs.py; `log_dir=None`: left alone) and show as `name` in Ray's log prefixes."""

    class Named(cls):
        def __init__(self, *args, actor_name: str, log_dir: str | None, **kwargs):
            self._actor_name = actor_name
            capture_output(actor_name, log_dir)
            super().__init__(*args, **kwargs)

        def __repr__(self) -> str:
            return self._actor_name

    Named.__name__, Named.__qualname__, Named.__doc__ = cls.__name__, cls.__qualname__, cls.__doc__
    return Named


def named_actor(cls, name: str, *, num_cpus: float = 1, num_gpus: float = 0, log_dir: str | None = None,
                max_restarts: int = 0, max_task_retries: int = 0, **kwargs):
    """One Ray actor of plain class `cls`, named `name` on the dashboard and in log prefixes; with
    `log_dir`, its process's third-party output goes to `{log_dir}/{name}.log`. `max_restarts`: Ray
    starts a dead one again (same name, same constructor arguments); `max_task_retries`: calls that
    were in flight are retried on the new process (only for idempotent roles)."""
    return ray.remote(_named(cls)).options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                                           max_restarts=max_restarts,
                                           max_task_retries=max_task_retries).remote(
        actor_name=name, log_dir=log_dir, **kwargs)


class ActorGroup:
    def __init__(self, cls, n: int, *, name_prefix: str, num_cpus_per_actor: float = 1,
                 num_gpus_per_actor: float = 0, log_dir: str | None = None, **init_kwargs: Any):
        bundle = {"CPU": num_cpus_per_actor} | ({"GPU": num_gpus_per_actor} if num_gpus_per_actor else {})
        self.placement_group = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        ray.get(self.placement_group.ready())
        # rank 0's node address and a free port there, found by a task in rank 0's bundle
        self.master_addr, self.master_port = ray.get(_address_and_port.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, 0)).remote())
        self.actors = [
            ray.remote(_named(cls)).options(
                name=f"{name_prefix}-{rank}", num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
            ).remote(actor_name=f"{name_prefix}-{rank}", log_dir=log_dir, rank=rank, world_size=n,
                     master_addr=self.master_addr, master_port=self.master_port, **init_kwargs)
            for rank in range(n)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; returns one ref per rank."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def run_per_rank(self, method: str, per_rank_args: list[tuple], **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*per_rank_args[rank], **kwargs)` on each rank (e.g. data-parallel shards)."""
        assert len(per_rank_args) == len(self.actors), "one argument tuple per rank"
        return [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.actors, per_rank_args)]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement_group)
