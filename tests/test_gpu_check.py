"""bench/gpu_check.sh's plumbing on a machine without a GPU: arguments, budgets, the JSON and the
table, the wheel install, a part stopped at its budget, and the gpu-tests part's verdict."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
TITLES = ["environment", "gpu tests", "training throughput", "train, index, serve", "encode throughput"]


def run_check(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, check=False)


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A real pure-Python wheel (one module, METADATA, WHEEL, RECORD with hashes) that pip installs."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def test_dry_run_writes_the_json_and_table_with_every_part_skipped(tmp_path: Path) -> None:
    make_wheel(tmp_path / "wheels", "gpu_check_probe", "1.0")
    out = tmp_path / "out"
    result = run_check("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--wheels", str(tmp_path / "wheels"), "--site", str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["minutes"] == 8
    assert [p["title"] for p in report["parts"]] == TITLES
    for part in report["parts"]:
        assert part["status"] == "skipped"
        assert part["reason"].startswith("dry run: would ") and f"within {part['budget_s']:.0f} s" in part["reason"]
    assert sum(p["budget_s"] for p in report["parts"]) <= 8 * 60
    assert report["summary"] == {"ok": 0, "failed": 0, "skipped": 5}
    # the install step is planned, not run
    wheels = report["wheels"]
    assert wheels["status"] == "skipped" and wheels["reason"].startswith("dry run: nothing installed (1 of 1")
    assert [row["action"] for row in wheels["plan"]] == ["install"]
    assert not (tmp_path / "site").exists()
    # the printed table: a row per part, then the wheels, then the counts; the same text in gpu_check.txt
    table = (out / "gpu_check.txt").read_text()
    assert table.strip() in result.stdout
    rows = table.splitlines()
    for i, title in enumerate(TITLES, 1):
        assert rows[1 + i].startswith(f"{i} {title}") and " skipped " in rows[1 + i]
    assert "wheels: skipped: dry run" in table
    assert rows[-1].startswith("0 ok, 0 failed, 5 skipped") and rows[-1].endswith(str(out / "gpu_check.json"))


def test_results_go_to_OUT_when_it_is_set(tmp_path: Path) -> None:
    result = run_check("--dry-run", "--work", str(tmp_path / "work"), env={"OUT": str(tmp_path / "device-out")})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "device-out" / "gpu_check.json").read_text())["dry_run"] is True


def test_budgets_scale_with_minutes_and_can_be_set_per_part(tmp_path: Path) -> None:
    full = run_check("--dry-run", "--out", str(tmp_path / "a"), "--work", str(tmp_path / "w"))
    half = run_check("--dry-run", "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w"), "--minutes", "4",
                     "--budget", "e2e=100", "--parts", "train,e2e")
    assert full.returncode == half.returncode == 0, half.stderr
    budgets = {p["name"]: p["budget_s"] for p in json.loads((tmp_path / "a" / "gpu_check.json").read_text())["parts"]}
    parts = {p["name"]: p for p in json.loads((tmp_path / "b" / "gpu_check.json").read_text())["parts"]}
    assert parts["train"]["budget_s"] == pytest.approx(budgets["train"] / 2, abs=0.1)
    assert parts["e2e"]["budget_s"] == 100
    assert parts["env"]["reason"] == "not asked for (--parts train,e2e)"
    assert parts["train"]["reason"].startswith("dry run")


@pytest.mark.parametrize("args, message", [
    (["--minutes", "0"], "--minutes must be above 0"),
    (["--parts", "env,gpu"], "choose from env, tests, train, e2e, encode"),
    (["--budget", "train=soon"], "'soon' is not a number of seconds"),
    (["--budget", "lunch=30"], "expected PART=SECONDS"),
])
def test_bad_arguments_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_check("--dry-run", "--out", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_wheels_install_where_missing_and_a_part_is_stopped_at_its_budget(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "gpu_check_probe", "1.0")  # not installed here
    make_wheel(wheels, "filelock", "0.0.1")  # installed here, and newer
    out, site = tmp_path / "out", tmp_path / "site"
    result = run_check("--parts", "env", "--budget", "env=1", "--out", str(out), "--work", str(tmp_path / "work"),
                       "--wheels", str(wheels), "--site", str(site))
    assert result.returncode == 1, result.stdout + result.stderr  # the stopped part counts as failed
    report = json.loads((out / "gpu_check.json").read_text())
    installed = report["wheels"]
    assert installed["status"] == "ok", installed
    assert installed["installed"] == ["gpu_check_probe-1.0-py3-none-any.whl"]
    actions = {row["name"]: row["action"] for row in installed["plan"]}
    assert actions["gpu-check-probe"] == "install" and actions["filelock"].startswith("present (")
    assert (site / "gpu_check_probe" / "__init__.py").is_file() and not (site / "filelock").exists()
    env = report["parts"][0]
    assert env["status"] == "failed" and env["reason"].startswith("ran past its budget of 1 s")
    assert env["log"] == "logs/env.log" and (out / "logs" / "env.log").read_text().startswith("$ ")
    assert [p["reason"] for p in report["parts"][1:]] == ["not asked for (--parts env)"] * 4


def test_gpu_tests_part_fails_when_every_gpu_test_skips(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_parts
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert ROOT / "tests" / "test_gpu.py" in gpu_parts.gpu_test_files()
    part = gpu_parts.Part("tests", tmp_path / "result.json", tmp_path / "work", seconds=300)
    gpu_parts.part_tests(part)
    part.finish()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and "no gpu test ran" in result["reason"]
    counts = result["results"]["pytest"]
    assert counts["passed"] == 0 and counts["skipped"] == counts["tests"] >= 5
    assert all("needs a CUDA GPU" in line for line in counts["skips"])
