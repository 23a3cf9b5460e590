"""Metric sinks: a JSONL file, TensorBoard and Ray custom metrics (Prometheus, through Ray's metrics export).

One `MetricsLogger.log(step, metrics)` call writes to all of them. The JSONL file is appended
and flushed each step, so a crash loses nothing already logged; on resume the lines of steps
after the checkpoint are dropped first so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time


class MetricsLogger:
    def __init__(self, output_dir: str, *, ray_metrics: bool = True, run_name: str = ""):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.start = time.time()
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = os.path.join(output_dir, "tensorboard")
        self.tb = SummaryWriter(self.tb_dir)
        self.gauges = {}
        self.run_name = run_name or os.path.basename(os.path.abspath(output_dir))
        if ray_metrics:
            from ray.util.metrics import Gauge

            self._gauge_cls = Gauge
        else:
            self._gauge_cls = None

    def truncate_after(self, step: int, sft_step: int) -> None:
        """Drop records written after the checkpoint being resumed (RL step > `step`, SFT step >
        `sft_step`), from the JSONL files and from TensorBoard (its events are rewritten from the
        kept records)."""
        for path in (self.path, os.path.join(os.path.dirname(self.path), "rollouts.jsonl")):
            truncate_jsonl(path, lambda r: r["step"] <= (sft_step if r.get("kind") == "sft" else step))
        from torch.utils.tensorboard import SummaryWriter

        self.tb.close()
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        self.tb = SummaryWriter(self.tb_dir)
        if os.path.exists(self.path):
            for record in read_metrics(os.path.dirname(self.path)):
                self._tensorboard(record)
        self.tb.flush()

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        record = {"step": step, "kind": kind, "time_s": round(time.time() - self.start, 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        self.tb.flush()
        if self._gauge_cls is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._gauge(k).set(float(v), tags={"run": self.run_name, "kind": kind})

    def _tensorboard(self, record: dict) -> None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                self.tb.add_scalar(k, v, record["step"])

    def _gauge(self, key: str):
        """The Ray gauge of metric `key`: `calibrl_` + the key with every other character than
        [a-zA-Z0-9_] as `_` (Prometheus shows it as `ray_calibrl_...`)."""
        name = "calibrl_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        if name not in self.gauges:
            self.gauges[name] = self._gauge_cls(name, description=f"calibrl metric {key}",
                                                tag_keys=("run", "kind"))
        return self.gauges[name]

    def close(self) -> None:
        self.tb.close()


def truncate_jsonl(path: str, keep) -> None:
    """Rewrite `path` atomically with the records for which keep(record) is true."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and keep(json.loads(line))]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
