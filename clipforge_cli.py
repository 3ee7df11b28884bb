"""The `clipforge` command: a thin dispatcher over each package's own CLI module.

Subcommands are imported lazily so that `clipforge serve` never loads the trainer
and `clipforge model info` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# subcommand -> module that defines `register(subparsers)`; each package owns its CLI.
_COMMANDS: dict[str, str] = {
    "model": "model.cli",
    "train": "training.cli",
    "eval": "training.cli",
    "tune": "training.cli",
    "index": "index.cli",
    "serve": "app.cli",
    "demo": "app.demo",
}
# subcommand -> modules whose `register(actions)` adds actions to it (optional packages may be absent).
_EXTENSIONS: dict[str, tuple[str, ...]] = {"model": ("interop.cli",)}


def _import_optional(module_name: str) -> ModuleType | None:
    """The module, or None when it (or its package) is not built yet; other import errors propagate."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="Train, index and serve CLIP models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen: set[str] = set()
    for name, module_name in _COMMANDS.items():
        if only is not None and name != only:
            continue
        if module_name in seen:
            continue
        module = _import_optional(module_name)
        if module is None:
            continue
        seen.add(module_name)
        actions = module.register(sub)
        for extension_name in _EXTENSIONS.get(name, ()):
            extension = _import_optional(extension_name)
            if extension is not None:
                extension.register(actions)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(first if first in _COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from model.errors import ClipforgeError

        if isinstance(exc, (ClipforgeError, FileNotFoundError, PermissionError)):
            print(f"clipforge: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
