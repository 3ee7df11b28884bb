"""The record every part of the GPU check keeps (bench/gpu_parts.py runs them), and the helpers more than one part uses.

A part is a list of steps, each timed and allowed to fail without stopping the next; the
result file ({"status", "reason", "summary", "results"}) is rewritten after every step, so
the driver keeps what was measured even when it stops the part at its budget.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tree's packages, before the import below

from model.fileio import write_atomic

MARGIN_S = 8.0  # a part plans to end this long before the driver would stop it


class Part:
    """A part's record: its steps, results and verdict, written to the result file after each change."""

    def __init__(self, name: str, result: Path, work: Path, seconds: float) -> None:
        self.name, self.result, self.work = name, result, work
        self.deadline = time.monotonic() + seconds - MARGIN_S
        self.results: dict[str, Any] = {"steps": [], "table": []}
        self.summary = ""
        self.reason = "started"
        work.mkdir(parents=True, exist_ok=True)
        self.save("running")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, status: str = "running") -> None:
        payload = {"status": status, "reason": self.reason, "summary": self.summary, "results": self.results}
        write_atomic(self.result, json.dumps(payload, indent=2, default=str))

    def step(self, label: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """Run one step; a failure is recorded, not raised; with less than needs_s left it is skipped."""
        record: dict[str, Any] = {"step": label}
        self.results["steps"].append(record)
        if self.left() < needs_s:
            record.update(status="skipped", reason=f"needs about {needs_s:.0f} s, {max(0, self.left()):.0f} s left")
            self.save()
            return None
        self.reason = f"in step {label}"
        self.save()
        print(f"--- {label}", flush=True)
        start = time.monotonic()
        try:
            value = fn()
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one step's failure must not stop the others
            traceback.print_exc()
            record.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:400]}")
            value = None
        record["seconds"] = round(time.monotonic() - start, 1)
        self.save()
        return value

    def skip(self, label: str, reason: str) -> None:
        self.results["steps"].append({"step": label, "status": "skipped", "reason": reason})
        self.save()

    def row(self, text: str) -> None:
        """A line of the printed table (the headline figures)."""
        self.results["table"].append(text)
        print(text, flush=True)
        self.save()

    def finish(self) -> None:
        failed = [s for s in self.results["steps"] if s["status"] == "failed"]
        self.reason = "; ".join(f"{s['step']}: {s['reason']}" for s in failed)[:600]
        self.save("failed" if failed else "ok")


def free_cuda() -> None:
    """Give back what the last model held, so the next step starts from an empty GPU and fresh peak stats."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_logged(cmd: list[str], timeout: float) -> None:
    """A clipforge command with its output in this part's log; a failure or overrun raises a one-line error."""
    print("$ " + " ".join(cmd), flush=True)
    what = " ".join(cmd[3:5])
    try:
        result = subprocess.run(cmd, cwd=ROOT, timeout=max(5.0, timeout), check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"clipforge {what} ran past {timeout:.0f} s and was stopped") from None
    if result.returncode != 0:
        raise RuntimeError(f"clipforge {what} exited with code {result.returncode} (see the log)")

