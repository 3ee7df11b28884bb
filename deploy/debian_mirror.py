"""Print the Debian mirror this machine's apt already uses, for debootstrap.

The compose smoke test builds its python:3.11-slim stand-in with debootstrap when no image
registry is reachable; the mirror must come from the machine's own apt configuration, so
that the repository never names one. Reads one-line `.list` files and deb822 `.sources`
files, and picks the first enabled `deb` entry of Debian's main archive (a release suite such
as bookworm with component main; not security, updates or a third-party repository).

Usage: python deploy/debian_mirror.py [APT_ETC_DIR]   (default /etc/apt)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Debian's release codenames and classes: a third-party repository ("nodistro", "bookworm-pgdg",
# "cloud-sdk-bookworm") also has a `main` component but does not carry Debian itself.
DEBIAN_SUITES = frozenset({
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
})


class MirrorNotFound(Exception):
    """No usable Debian archive entry in the apt sources."""


def _one_line_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each `deb` line of a sources.list file."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):  # options such as [arch=amd64 signed-by=...]
            end = rest.find("]")
            if end < 0:
                continue
            rest = rest[end + 1:].strip()
        fields = rest.split()
        if len(fields) >= 2:
            entries.append((fields[0], [fields[1]], fields[2:]))
    return entries


def _deb822_entries(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each enabled `Types: deb` stanza of a .sources file."""
    entries = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key is not None:  # continuation line
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    return entries


def apt_entries(apt_dir: Path) -> list[tuple[str, list[str], list[str]]]:
    """Every enabled binary-package entry, in apt's reading order (sources.list first, then sources.list.d/ sorted)."""
    entries = []
    main = apt_dir / "sources.list"
    if main.is_file():
        entries += _one_line_entries(main.read_text(encoding="utf-8", errors="replace"))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                entries += _one_line_entries(path.read_text(encoding="utf-8", errors="replace"))
            elif path.suffix == ".sources":
                entries += _deb822_entries(path.read_text(encoding="utf-8", errors="replace"))
    return entries


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """URI of the first Debian main archive in the apt sources, without a trailing slash."""
    for uri, suites, components in apt_entries(apt_dir):
        if not uri.startswith(("http://", "https://", "file:/")):
            continue
        if "main" not in components:
            continue
        if not any(suite in DEBIAN_SUITES for suite in suites):  # bookworm-security etc. are not the main archive
            continue
        return uri.rstrip("/")
    raise MirrorNotFound(f"no Debian main archive (a `deb` entry with component main) in {apt_dir}/sources.list*")


def main(argv: list[str]) -> int:
    apt_dir = Path(argv[1]) if len(argv) > 1 else Path("/etc/apt")
    try:
        print(debian_mirror(apt_dir))
    except MirrorNotFound as exc:
        print(f"debian_mirror: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
