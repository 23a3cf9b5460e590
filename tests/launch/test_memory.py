"""Memory per actor: what a process reports of itself and its children, and the driver's watch over
real Ray actors, which never waits on a busy one and outlives a killed one."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import ray

from actors.group import named_actor
from launch.memory import MemoryWatch, last_memory, memory_by_actor, peak_line

MB = 1e6


PROBE = """
import json, multiprocessing, sys
from actors.memory import process_memory

def hold(megabytes, ready, release):
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):  # zero pages: touch them so they are resident
        block[i] = 1
    ready.set()
    release.wait(30)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    before = process_memory()
    child = ctx.Process(target=hold, args=(300, ready, release))
    child.start()
    assert ready.wait(30)
    during = process_memory()
    release.set()
    child.join(30)
    print(json.dumps([before, during, process_memory()]))
"""


def test_a_child_process_memory_is_reported_with_its_parent_once(tmp_path):
    # in a fresh process: this one's other children (a test session's Ray cluster) come and go
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    before, during, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert "children_pss_gb" not in before  # no child yet
    # the child's 300 MiB (315 MB) are its own, counted once among its parent's children; the parent's
    # own resident memory did not grow by them
    assert during["children_pss_gb"] > 300 * MB / 1e9
    assert during["rss_gb"] - before["rss_gb"] < 100 * MB / 1e9
    assert during["peak_rss_gb"] >= during["rss_gb"]
    assert "gpu_peak_gb" not in during  # no CUDA device in use here
    assert "children_pss_gb" not in after  # the child is gone: so is its memory


@pytest.mark.slow
def test_the_watch_never_waits_on_a_busy_actor_and_outlives_a_dead_one(ray_local):
    class Busy:  # defined here: Ray pickles it by value (this test module is not importable there)
        def grow(self, megabytes: int) -> None:
            self.block = bytearray(megabytes * 1024 * 1024)
            for i in range(0, len(self.block), 4096):
                self.block[i] = 1

        def work(self, seconds: float) -> None:
            time.sleep(seconds)

    idle = named_actor(Busy, "mem-idle", num_cpus=0)
    busy = named_actor(Busy, "mem-busy", num_cpus=0)
    ray.get([idle.grow.remote(200), busy.grow.remote(10)])
    actors = [idle, busy]
    watch = MemoryWatch(lambda: list(actors))
    try:
        working = busy.work.remote(6.0)
        t0 = time.monotonic()
        first = watch.poll()
        assert time.monotonic() - t0 < 1.0  # asked, not waited for
        assert set(memory_by_actor(first)) == {"driver"}
        # the idle actor answers at once; the busy one only when its work is done
        deadline = time.monotonic() + 20
        while "mem-idle" not in watch.latest and time.monotonic() < deadline:
            time.sleep(0.2)
            watch.poll()
        assert "mem-busy" not in watch.latest
        idle_mem = watch.latest["mem-idle"]
        assert idle_mem["peak_rss_gb"] >= idle_mem["rss_gb"] > 200 * MB / 1e9  # its 200 MiB block
        ray.get(working)
        metrics = watch.final(timeout=20)
        by_actor = memory_by_actor(metrics)
        assert set(by_actor) == {"mem-idle", "mem-busy", "driver"}
        assert by_actor["mem-idle"]["rss_gb"] - by_actor["mem-busy"]["rss_gb"] > 150 * MB / 1e9

        ray.kill(busy)  # a dead actor: its last sample stays, the watch goes on
        time.sleep(1.0)
        watch.poll()
        after = watch.final(timeout=10)
        assert set(memory_by_actor(after)) == {"mem-idle", "mem-busy", "driver"}
        assert not watch._pending  # the dead actor's question was answered (with its death) and dropped
    finally:
        for a in (idle, busy):
            ray.kill(a)


def test_the_last_record_with_memory_gives_each_process_peak():
    records = [{"step": 1, "memory/learner-0/peak_rss_gb": 1.0, "memory/learner-0/rss_gb": 0.5},
               {"step": 2, "memory/rollout-0/peak_rss_gb": 2.25, "memory/rollout-0/gpu_peak_gb": 7.5,
                "memory/learner-0/peak_rss_gb": 1.5, "loss/pg": 0.1},
               {"step": 2, "kind": "eval", "val/accuracy": 0.5}]
    memory = last_memory(records)
    assert memory == {"rollout-0": {"peak_rss_gb": 2.25, "gpu_peak_gb": 7.5},
                      "learner-0": {"peak_rss_gb": 1.5}}
    assert peak_line(memory) == "rollout-0 2.25 (GPU 7.50), learner-0 1.50"
