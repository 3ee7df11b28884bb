"""deploy/debian_mirror.py: the compose smoke test takes debootstrap's mirror from apt's own sources."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "debian_mirror.py"

_spec = importlib.util.spec_from_file_location("debian_mirror", SCRIPT)
assert _spec is not None and _spec.loader is not None
debian_mirror = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(debian_mirror)

# Made-up hosts under the reserved .example domain: the repository names no real mirror.
MIRROR = "http://mirror.example/debian"
SECURITY = "http://security.example/debian-security"
THIRD_PARTY = "https://vendor.example/apt"


def _apt(tmp_path: Path, sources_list: str | None = None, parts: dict[str, str] | None = None) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (apt / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (apt / "sources.list.d" / name).write_text(text)
    return apt


def test_deb822_sources_pick_the_main_archive_not_security(tmp_path: Path) -> None:
    apt = _apt(tmp_path, parts={"debian.sources": (
        f"Types: deb\n# a comment\nURIs: {MIRROR}/\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {SECURITY}\nSuites: bookworm-security\nComponents: main\n"
    )})
    assert debian_mirror.debian_mirror(apt) == MIRROR


def test_security_first_still_gives_the_main_archive(tmp_path: Path) -> None:
    apt = _apt(tmp_path, sources_list=f"deb {SECURITY} bookworm-security main\ndeb {MIRROR} bookworm main contrib\n")
    assert debian_mirror.debian_mirror(apt) == MIRROR


def test_one_line_entries_with_options_and_comments(tmp_path: Path) -> None:
    apt = _apt(tmp_path, sources_list=(
        "# deb http://commented.example/debian bookworm main\n"
        f"deb-src {MIRROR}-src bookworm main\n"
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} trixie main # trailing\n"
    ))
    assert debian_mirror.debian_mirror(apt) == MIRROR


def test_third_party_repositories_and_disabled_stanzas_are_skipped(tmp_path: Path) -> None:
    apt = _apt(tmp_path, parts={
        "a-vendor.list": f"deb {THIRD_PARTY} cloud-sdk-bookworm main\ndeb {THIRD_PARTY} bookworm-pgdg main\n",
        "b-vendor.sources": f"Types: deb\nURIs: {THIRD_PARTY}\nSuites: nodistro\nComponents: main\n",
        "c-off.sources": "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n",
        "d-docker.list": f"deb {THIRD_PARTY}/debian bookworm stable\n",
        "e-debian.sources": f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm\nComponents: main\n",
        "ignored.list.disabled": "deb http://disabled.example/debian bookworm main\n",
    })
    assert debian_mirror.debian_mirror(apt) == MIRROR


def test_no_debian_archive_is_a_clear_error(tmp_path: Path) -> None:
    apt = _apt(tmp_path, sources_list=f"deb {THIRD_PARTY} nodistro main\n")
    with pytest.raises(debian_mirror.MirrorNotFound, match="no Debian main archive"):
        debian_mirror.debian_mirror(apt)
    result = subprocess.run([sys.executable, str(SCRIPT), str(apt)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no Debian main archive" in result.stderr and "Traceback" not in result.stderr


def test_command_line_prints_the_mirror(tmp_path: Path) -> None:
    apt = _apt(tmp_path, sources_list=f"deb {MIRROR} bookworm main\n")
    result = subprocess.run([sys.executable, str(SCRIPT), str(apt)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == MIRROR
