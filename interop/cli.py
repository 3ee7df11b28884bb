"""`clipforge model import SRC --out CKPT` and `clipforge model export CKPT --to FORMAT:DIR`.

Each format's module is imported only when its scheme is used, so `clipforge model info`
runs without transformers or onnx installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from model.errors import ClipforgeError

IMPORT_SCHEMES = ("hf", "open_clip")
EXPORT_SCHEMES = ("hf", "onnx")


def split_scheme(value: str, schemes: tuple[str, ...], what: str) -> tuple[str, Path]:
    """'hf:/models/x' -> ('hf', Path('/models/x')); one line naming the accepted forms otherwise."""
    scheme, sep, rest = value.partition(":")
    if not sep or scheme not in schemes or not rest:
        forms = " or ".join(f"{s}:PATH" for s in schemes)
        raise ClipforgeError(f"{what} must be {forms}, got {value!r}")
    return scheme, Path(rest).expanduser()


def _module(name: str, scheme: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise ClipforgeError(f"{scheme}: is not available in this installation ({name} is missing)") from exc
        raise ClipforgeError(f"{scheme}: needs the package {exc.name}: pip install 'clipforge[hf]'") from exc


def _one_line(action: str, exc: Exception) -> ClipforgeError:
    """Bad files surface from torch, safetensors and tokenizers as many error types: one line each."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ClipforgeError(f"{action} failed: {first}")


def cmd_import(args: argparse.Namespace) -> int:
    scheme, path = split_scheme(args.source, IMPORT_SCHEMES, "SRC")
    if args.arch and scheme != "open_clip":
        raise ClipforgeError("--arch applies to open_clip: sources only")
    try:
        if scheme == "hf":
            digest = _module("interop.hf", scheme).import_hf(path, args.out)
        else:
            digest = _module("interop.open_clip", scheme).import_open_clip(path, args.out, arch=args.arch)
    except (ClipforgeError, FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise _one_line(f"import of {args.source}", exc) from exc
    suffix = f" (content hash {digest[:12]})" if isinstance(digest, str) else ""
    print(f"imported {args.source} -> {args.out}{suffix}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    scheme, path = split_scheme(args.to, EXPORT_SCHEMES, "--to")
    notes: list[str] = []
    try:
        if scheme == "hf":
            hf_export = _module("interop.hf_export", scheme)
            hf_export.export_hf(args.checkpoint, path)
            notes = hf_export.read_notes(path)
        else:
            _module("interop.onnx_export", scheme).export_onnx(args.checkpoint, path)
    except (ClipforgeError, FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise _one_line(f"export to {args.to}", exc) from exc
    print(f"exported {args.checkpoint} -> {args.to}")
    for note in notes:
        print(f"clipforge: note: transformers will not reproduce {note}", file=sys.stderr)
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Adds `import` and `export` to the `model` subcommand's actions."""
    imp = actions.add_parser("import", help="import a pretrained CLIP (transformers or open_clip) as a checkpoint")
    imp.add_argument("source", metavar="SRC", help="hf:DIR (a transformers CLIPModel folder) or open_clip:PATH")
    imp.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write")
    imp.add_argument("--arch", help="open_clip architecture of a bare state-dict file (e.g. ViT-B-32)")
    imp.set_defaults(func=cmd_import)
    exp = actions.add_parser("export", help="export a checkpoint for transformers or onnxruntime")
    exp.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    exp.add_argument("--to", required=True, metavar="FORMAT:DIR", help="hf:DIR or onnx:DIR")
    exp.set_defaults(func=cmd_export)
