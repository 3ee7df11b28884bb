"""One prepared GPU check: everything clipforge's CUDA path must show, in one run of at most --minutes.

    bash bench/gpu_check.sh                         # on a GPU machine: all five parts, about 8 minutes
    bash bench/gpu_check.sh --dry-run               # anywhere: the plumbing only, every part skipped
    bash bench/gpu_check.sh --parts e2e --minutes 4 # one part again

Parts: 1 env (GPU, driver, torch, CUDA, bf16; the wheels installed), 2 tests (the `gpu`-marked
tests), 3 train (training samples/s, MFU and peak memory for base and thinkclip, eager and
compiled, at the largest batch of a short sweep), 4 e2e (`clipforge train` on cuda in bf16
with --compile, `index build --device cuda`, `serve --device cuda` answering /classify and
/search), 5 encode (images/s and texts/s at batch 1 and 256).

Each part runs in its own process group under its own time budget, so a crash, an
out-of-memory error or a hang costs that part alone; each ends ok, failed or skipped with
the reason. Results go to --out (default $OUT when set, else bench/results/gpu_check):
gpu_check.json (rewritten after every part, so a run cut short keeps what finished),
gpu_check.txt (the printed table) and logs/<part>.log. Bulky artefacts (the training run,
the index) stay in --work, outside --out.

Before the parts, wheels brought along in --wheels (bench/gpu_wheels.sh makes them) are
installed with `pip install --no-index --no-deps --target --site`, each only where the
interpreter lacks that package or has an older version; the parts then see --site on
PYTHONPATH. The project itself is used from the tree, never installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_wheels import install_wheels

ROOT = Path(__file__).resolve().parents[1]


def _load_fileio() -> Any:
    """model/fileio.py by its path: importing the model package would pull torch into the driver,
    which only orchestrates (the dry run stays instant, and CUDA is initialised in the parts alone)."""
    spec = importlib.util.spec_from_file_location("clipforge_fileio", ROOT / "model" / "fileio.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fileio = _load_fileio()
utc_timestamp, write_atomic = _fileio.utc_timestamp, _fileio.write_atomic

PARTS: dict[str, str] = {
    "env": "environment",
    "tests": "gpu tests",
    "train": "training throughput",
    "e2e": "train, index, serve",
    "encode": "encode throughput",
}
# Seconds of each part in an 8-minute run (15 s of it left for the wheel install); --minutes scales
# them, --budget PART=SECONDS overrides one.
DEFAULT_BUDGET_S: dict[str, float] = {"env": 20, "tests": 55, "train": 190, "e2e": 165, "encode": 35}
DEFAULT_MINUTES = 8.0
MIN_PART_S = 10.0  # a part given less than this is skipped rather than started to be killed
KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
DEFAULT_WHEELS = ROOT / ".cache" / "gpu-wheels"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "clipforge-site"
LOG_TAIL_CHARS = 1500


def parse_budget(text: str) -> tuple[str, float]:
    """PART=SECONDS, for --budget."""
    name, sep, value = text.partition("=")
    if not sep or name not in PARTS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return name, seconds


def parse_parts(text: str) -> list[str]:
    """A comma-separated subset of the parts, kept in the check's own order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PARTS)} (comma-separated)")
    return [n for n in PARTS if n in names]


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results" / "gpu_check"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: $OUT when set, else bench/results/gpu_check)")
    parser.add_argument("--dry-run", action="store_true",
                        help="exercise the plumbing only: no wheel install, no GPU work, every part skipped")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="wall-clock budget of the whole check; the part budgets scale with it (default 8)")
    parser.add_argument("--budget", type=parse_budget, action="append", default=[], metavar="PART=SECONDS",
                        help="one part's budget in seconds, instead of its share of --minutes (repeatable)")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="folder of wheels brought along (default .cache/gpu-wheels)")
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE,
                        help="where those wheels are installed (pip --target; default: a folder in the temp dir)")
    parser.add_argument("--no-install", action="store_true", help="do not install the wheels")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the parts' artefacts (training run, index; default: a new temp folder)")
    return parser


def part_budgets(minutes: float, overrides: list[tuple[str, float]]) -> dict[str, float]:
    scale = minutes / DEFAULT_MINUTES
    budgets = {name: seconds * scale for name, seconds in DEFAULT_BUDGET_S.items()}
    budgets.update(dict(overrides))
    return budgets


# --------------------------------------------------------------------------- parts
def dry_run_reason(name: str, budget: float) -> str:
    plans = {
        "env": "would record GPU, driver, torch, CUDA and bf16 support, and import every package clipforge needs",
        "tests": "would run pytest -m gpu on the test files that carry the gpu marker",
        "train": "would time base and thinkclip at 224 px in bf16, eager and torch.compile, at the largest batch "
                 "of a sweep, against the measured bf16 matmul peak (open_clip beside them where it imports)",
        "e2e": "would run clipforge train (shapes-64, cuda, bf16, --compile), index build --device cuda, and "
               "serve --device cuda answering /classify and /search",
        "encode": "would time images/s and texts/s at batch 1 and 256 in bf16 for base, a ViT-B/32-sized preset and "
                  "open_clip's ViT-B-32 (random weights) imported by clipforge model import",
    }
    return f"dry run: {plans[name]} within {budget:.0f} s"


def cuda_visible() -> bool:
    """torch.cuda.is_available() in a child, so the driver itself never initialises CUDA."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120, check=False)
    return probe.stdout.strip().endswith("True")


def _kill_group(proc: subprocess.Popen) -> None:
    """End the part's process group (its servers, trainers and loader workers with it)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


def run_part(name: str, budget: float, *, work: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """One part in its own process group, killed at its budget; its result file, or why there is none."""
    result_path = work / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_parts.py"), name, "--result", str(result_path),
           "--work", str(work / name), "--seconds", f"{budget:.1f}"]
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    seconds = time.monotonic() - start
    try:
        part = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        part = {}
    results = part.get("results", {})
    if timed_out:
        status, reason = "failed", f"ran past its budget of {budget:.0f} s and was stopped"
        if part.get("reason"):
            reason += f" (last step: {part['reason']})"
    elif proc.returncode != 0:
        last = next((l for l in reversed(_tail(log).splitlines()) if l.strip()), "")
        status = "failed"
        reason = part.get("reason") if part.get("status") == "failed" else None
        reason = reason or f"exited with code {proc.returncode}: {last[:300]}"
    else:
        status = part.get("status", "failed")
        reason = part.get("reason") or ("" if status == "ok" else "the part wrote no result")
    out = {"status": status, "reason": reason, "seconds": round(seconds, 1), "summary": part.get("summary", ""),
           "results": results}
    if status == "failed":
        out["log_tail"] = _tail(log)
    return out


# --------------------------------------------------------------------------- report
def format_table(report: dict[str, Any]) -> str:
    lines = [f"clipforge gpu check  {report['started']}  {'dry run' if report['dry_run'] else report['device']}",
             f"{'#':>1} {'part':22s} {'status':8s} {'seconds':>7s} {'budget':>6s}  note"]
    for i, part in enumerate(report["parts"], 1):
        note = part.get("summary") or part.get("reason") or ""
        if part["status"] != "ok" and part.get("summary") and part.get("reason"):
            note = f"{part['reason']}; {part['summary']}"
        lines.append(f"{i:>1} {part['title']:22s} {part['status']:8s} {part.get('seconds', 0):7.1f} "
                     f"{part['budget_s']:6.0f}  {note}")
    wheels = report["wheels"]
    lines.append(f"  wheels: {wheels['status']}: {wheels['reason']}")
    for part in report["parts"]:
        for row in part.get("results", {}).get("table", []):
            lines.append(f"  {part['name']:6s} {row}")
    counts = report["summary"]
    lines.append(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
                 f"{report.get('seconds', 0):.0f} s; {report['json']}")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    counts = {s: sum(p["status"] == s for p in report["parts"]) for s in ("ok", "failed", "skipped")}
    report["summary"] = counts
    write_atomic(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 60:
        parser.error(f"--minutes must be above 0 and at most 60, got {args.minutes:g}")
    out = (args.out or default_out()).resolve()
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot create it ({exc.strerror or exc})")
    work = (args.work or Path(tempfile.mkdtemp(prefix="clipforge-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    budgets = part_budgets(args.minutes, args.budget)
    start = time.monotonic()
    deadline = start + args.minutes * 60

    report: dict[str, Any] = {
        "schema": 1, "command": " ".join([Path(sys.executable).name, *sys.argv]), "started": utc_timestamp(),
        "dry_run": args.dry_run, "minutes": args.minutes, "device": "not probed", "out": str(out),
        "json": str(out / "gpu_check.json"), "work": str(work),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "parts": [{"name": n, "title": t, "status": "pending", "reason": "", "budget_s": round(budgets[n], 1)}
                  for n, t in PARTS.items()],
    }
    report["wheels"] = install_wheels(args.wheels.resolve(), args.site.resolve(), args.dry_run, not args.no_install)
    write_report(out, report)

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(args.site.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    gpu: dict[str, bool] = {}  # filled by the env part, else probed once when a GPU part is due

    def has_gpu() -> bool:
        if "cuda" not in gpu:
            gpu["cuda"] = cuda_visible()
        return gpu["cuda"]

    for part in report["parts"]:
        name, budget = part["name"], budgets[part["name"]]
        left = deadline - time.monotonic()
        if name not in args.parts:
            part.update(status="skipped", reason=f"not asked for (--parts {','.join(args.parts)})")
        elif args.dry_run:
            part.update(status="skipped", reason=dry_run_reason(name, budget))
        elif name != "env" and not has_gpu():
            part.update(status="skipped", reason="no CUDA GPU: torch.cuda.is_available() is False here")
        elif left < MIN_PART_S:
            part.update(status="skipped", reason=f"no time left of --minutes {args.minutes:g} ({left:.0f} s)")
        else:
            part["budget_s"] = round(min(budget, left), 1)
            print(f"[{utc_timestamp()}] part {name} ({PARTS[name]}): up to {part['budget_s']:.0f} s", flush=True)
            part.update(run_part(name, part["budget_s"], work=work, log=out / "logs" / f"{name}.log", env=env))
            part["log"] = f"logs/{name}.log"
            print(f"  {part['status']}: {part.get('summary') or part['reason']}", flush=True)
            if name == "env" and "cuda_available" in part["results"]:
                gpu["cuda"] = bool(part["results"]["cuda_available"])
                report["device"] = part["results"].get("gpu_name") or "no CUDA GPU"
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(out, report)

    report["finished"] = utc_timestamp()
    write_report(out, report)
    table = format_table(report)
    write_atomic(out / "gpu_check.txt", table + "\n")
    print(table)
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
