"""The GPU check's wheel install: the wheels brought along (bench/gpu_wheels.sh makes them),
each planned against this interpreter and installed only where it lacks that package or has
an older version, with pip from the folder alone into a --target site."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PIP_OUTPUT_CHARS = 1500  # of a failed pip's output, the tail kept in the report


def _wheel_name_version(path: Path) -> tuple[str, str]:
    try:
        from packaging.utils import parse_wheel_filename

        name, version, _, _ = parse_wheel_filename(path.name)
        return str(name), str(version)
    except ImportError:  # no packaging: the file name's first two fields
        name, version = path.name.split("-")[:2]
        return name.replace("_", "-").lower(), version


def _wheel_fits_here(path: Path) -> bool:
    """Whether this interpreter can install the wheel (its tags), True where packaging is absent."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return True
    supported = set(sys_tags())
    return any(tag in supported for tag in parse_wheel_filename(path.name)[3])


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _older(installed: str, brought: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) < Version(brought)
    except Exception:  # noqa: BLE001 - no packaging or an odd version string: what is there will do
        return False


def plan_wheels(wheel_dir: Path) -> list[dict[str, Any]]:
    """For each wheel brought along: install it, or not (the package is there, or the wheel cannot go here)."""
    plan = []
    for path in sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []:
        name, version = _wheel_name_version(path)
        have = _installed_version(name)
        if have is not None and not _older(have, version):
            action = f"present ({have})"
        elif not _wheel_fits_here(path):
            action = "unusable here (its tags do not fit this interpreter)"
        else:
            action = "install" if have is None else f"install (here {have})"
        plan.append({"wheel": path.name, "name": name, "version": version, "bytes": path.stat().st_size,
                     "action": action})
    return plan


def install_wheels(wheel_dir: Path, site: Path, dry_run: bool, enabled: bool) -> dict[str, Any]:
    """The install step: pip from the folder alone, into `site`, only the packages this interpreter lacks."""
    plan = plan_wheels(wheel_dir)
    todo = [wheel_dir / row["wheel"] for row in plan if row["action"].startswith("install")]
    record: dict[str, Any] = {"wheel_dir": str(wheel_dir), "site": str(site), "plan": plan,
                              "mib": round(sum(row["bytes"] for row in plan) / 2**20, 1), "installed": []}
    if dry_run:
        return {**record, "status": "skipped", "reason": f"dry run: nothing installed ({len(todo)} of "
                f"{len(plan)} wheels would be, the packages this interpreter lacks)"}
    if not enabled:
        return {**record, "status": "skipped", "reason": "--no-install"}
    if not plan:
        return {**record, "status": "skipped", "reason": f"no wheels in {wheel_dir} (bench/gpu_wheels.sh makes them)"}
    if not todo:
        return {**record, "status": "ok", "reason": "every package brought along is already here"}
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site), *map(str, todo)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {**record, "status": "failed", "reason": "pip ran past 300 s", "seconds": time.monotonic() - start}
    record["seconds"] = round(time.monotonic() - start, 1)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-PIP_OUTPUT_CHARS:]
        return {**record, "status": "failed", "reason": f"pip exited with {result.returncode}", "pip_output": tail}
    record["installed"] = [path.name for path in todo]
    return {**record, "status": "ok", "reason": f"installed {len(todo)} of {len(plan)} wheels into {site}"}
