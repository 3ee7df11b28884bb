"""The five parts of bench/gpu_check.py, one process each: `gpu_parts.py PART --result F --work D --seconds S`.

This file holds parts 1 (env) and 2 (tests) and the dispatch; 3 train is in bench/gpu_train.py,
4 e2e in bench/gpu_e2e.py, 5 encode in bench/gpu_encode.py, and the Part record they all write
(timed steps, the result file rewritten after each) with the helpers they share in bench/gpu_steps.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from gpu_e2e import part_e2e
from gpu_encode import part_encode
from gpu_steps import ROOT, Part
from gpu_train import part_train

# --------------------------------------------------------------------------- 1 environment
# pyproject's runtime packages by import name; optuna is imported by `clipforge tune` alone.
IMPORTS = {"torch": "torch", "numpy": "numpy", "pillow": "PIL", "tokenizers": "tokenizers",
           "safetensors": "safetensors", "pydantic": "pydantic", "pydantic-settings": "pydantic_settings",
           "tqdm": "tqdm", "faiss-cpu": "faiss", "fastapi": "fastapi", "uvicorn": "uvicorn",
           "python-multipart": "python_multipart", "httpx": "httpx", "prometheus-client": "prometheus_client",
           "tensorboard": "tensorboard", "optuna": "optuna", "matplotlib": "matplotlib", "pyarrow": "pyarrow",
           "filelock": "filelock", "pytest": "pytest", "open-clip-torch": "open_clip"}
NOT_NEEDED_HERE = {"optuna": "only clipforge tune imports it",
                   "open-clip-torch": "optional: the rival in the throughput part"}


def _requirements() -> dict[str, str]:
    """pyproject's runtime dependencies, name -> specifier."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return {str(Requirement(d).name): str(Requirement(d).specifier) for d in deps}


def _package(dist: str, module: str, spec: str) -> dict[str, Any]:
    import importlib

    row: dict[str, Any] = {"wanted": spec or "any"}
    try:
        mod = importlib.import_module(module)
        row["version"] = metadata.version(dist) if _has_dist(dist) else getattr(mod, "__version__", "?")
        row["from"] = str(Path(getattr(mod, "__file__", "") or "").parent)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported like a missing one
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return row
    if spec:
        from packaging.specifiers import SpecifierSet

        row["satisfies"] = SpecifierSet(spec).contains(row["version"], prereleases=True)
    return row


def _has_dist(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _nvidia_smi() -> dict[str, str]:
    fields = "name,driver_version,memory.total,clocks.max.sm,power.limit,persistence_mode"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
    return dict(zip(fields.split(","), (v.strip() for v in out.split(",")), strict=True))


def part_env(part: Part) -> None:
    import torch

    from model.clip import peak_flops

    r = part.results
    r.update(python=sys.version.split()[0], executable=sys.executable, cpus=os.cpu_count(), torch=torch.__version__,
             torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
             cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        r["nvidia_smi"] = part.step("nvidia-smi", _nvidia_smi)
    else:
        part.skip("nvidia-smi", "not on the PATH")
    if r["cuda_available"]:
        def gpu() -> dict[str, Any]:
            device = torch.device("cuda", 0)
            props = torch.cuda.get_device_properties(device)
            table_peak = peak_flops(device)
            return {"gpu_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                    "bf16": torch.cuda.is_bf16_supported(),
                    "table_bf16_peak_tflops": table_peak / 1e12 if table_peak else None}

        r.update(part.step("gpu properties", gpu) or {})
    else:
        part.results["steps"].append({"step": "cuda", "status": "failed",
                                      "reason": "torch sees no CUDA GPU (torch.cuda.is_available() is False)"})

    def packages() -> dict[str, Any]:
        specs = _requirements()
        rows = {dist: _package(dist, module, specs.get(dist, "")) for dist, module in IMPORTS.items()}
        missing = [d for d, row in rows.items() if "error" in row and d not in NOT_NEEDED_HERE]
        if missing:
            raise RuntimeError(f"cannot import {', '.join(missing)}: bring their wheels (bench/gpu_wheels.sh)")
        return rows

    r["packages"] = part.step("packages", packages)
    if r["packages"] is None:  # the step failed: list them all the same
        specs = _requirements()
        r["packages"] = {dist: _package(dist, module, specs.get(dist, "")) for dist, module in IMPORTS.items()}
    unmet = [f"{d} {row['version']} (pyproject {row['wanted']})" for d, row in r["packages"].items()
             if row.get("satisfies") is False]
    absent = [f"{d} ({NOT_NEEDED_HERE.get(d, 'missing')})" for d, row in r["packages"].items() if "error" in row]
    gpu_text = (f"{r.get('gpu_name')}, sm_{r.get('capability', '?').replace('.', '')}, {r.get('memory_gib')} GiB, "
                f"bf16 {'yes' if r.get('bf16') else 'no'}" if r["cuda_available"] else "no CUDA GPU")
    driver = (r.get("nvidia_smi") or {}).get("driver_version", "?")
    part.summary = (f"{gpu_text}; driver {driver}; torch {r['torch']} (CUDA {r['torch_cuda']}); python {r['python']}"
                    + (f"; not importable: {', '.join(absent)}" if absent else ""))
    if unmet:
        part.row("versions other than pyproject's (the machine's own are used): " + ", ".join(unmet))


# --------------------------------------------------------------------------- 2 the gpu tests
def gpu_test_files() -> list[Path]:
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text(encoding="utf-8")]


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems, skips = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                problems.append(f"{name}: {(node.get('message') or '')[:300]}")
        for node in case.findall("skipped"):
            skips.append(f"{name}: {(node.get('message') or '')[:200]}")
    counts["problems"], counts["skips"] = problems, skips
    return counts


def part_tests(part: Part) -> None:
    files = gpu_test_files()
    part.results["files"] = [str(p.relative_to(ROOT)) for p in files]
    if not files:
        part.results["steps"].append({"step": "pytest", "status": "failed",
                                      "reason": "no test file carries the gpu marker"})
        return
    junit = part.work / "junit.xml"

    def pytest() -> dict[str, Any]:
        per_test = max(30, int(part.left() / 2))
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", f"timeout={per_test}", *map(str, files)]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, timeout=max(10.0, part.left()), check=False)
        counts = _junit_counts(junit)
        counts["exit_code"] = proc.returncode
        part.results["pytest"] = counts
        part.summary = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                        f"{counts['skipped']} skipped")
        for line in counts["problems"] + counts["skips"]:
            part.row(line)
        if counts["failures"] or counts["errors"] or proc.returncode not in (0, 5):
            raise RuntimeError(f"pytest exited with {proc.returncode}: " + "; ".join(counts["problems"])[:300])
        if counts["passed"] == 0:
            raise RuntimeError("no gpu test ran: " + "; ".join(counts["skips"])[:300])
        return counts

    part.step("pytest", pytest)


PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "env": part_env, "tests": part_tests, "train": part_train, "e2e": part_e2e, "encode": part_encode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=list(PART_FUNCTIONS))
    parser.add_argument("--result", type=Path, required=True, help="JSON file this part writes as it goes")
    parser.add_argument("--work", type=Path, required=True, help="folder for its artefacts")
    parser.add_argument("--seconds", type=float, required=True, help="its budget (the driver stops it then)")
    args = parser.parse_args(argv)
    part = Part(args.part, args.result, args.work, args.seconds)
    try:
        PART_FUNCTIONS[args.part](part)
    except Exception as exc:  # noqa: BLE001 - an error outside any step still ends in a result file
        traceback.print_exc()
        part.results["steps"].append({"step": "part", "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    part.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
