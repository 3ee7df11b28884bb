"""Running a module under torchrun on CPU for the multi-process tests; holds no tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(launcher: list[str], module_argv: list[str], log: Path, *, timeout: float,
                 env: dict[str, str] | None = None) -> tuple[int, str]:
    """`torchrun LAUNCHER -m MODULE_ARGV`, its output in `log`; the whole process group killed on a hang.

    A file, not a pipe, takes the output, so a hung worker cannot block reading it. The workers run
    in sessions of their own; SIGTERM makes the launcher stop them first.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", *module_argv],
            cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise AssertionError(f"torchrun did not finish in {timeout:g} s (a collective only some ranks joined?)\n"
                                 + log.read_text()[-3000:]) from None
    return proc.returncode, log.read_text()
