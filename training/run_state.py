"""Resumable run state: checkpoint directories that carry the optimiser, step, RNG and data position.

A training checkpoint is a normal model checkpoint (model.save_checkpoint: weights,
config, tokenizer, meta) plus two files beside them:

    trainer_state.safetensors   optimiser moments, RNG states (uint8 byte tensors)
    trainer_state.json          step, epoch, data position, best metric, optimiser hyperparameters

Nothing is pickled. The whole directory is built in a hidden staging folder and published
with renames, so a kill at any moment leaves the previous or the new checkpoint intact;
if a kill lands between the two renames of a swap, `find_resumable` recovers the old one.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model import CLIP, CLIPTokenizer, save_checkpoint
from model.errors import CheckpointError
from model.fileio import publish_directory

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a training step can touch: torch CPU/CUDA as byte tensors, Python and NumPy as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's own GPU only: reading every device's state would open a CUDA context on
        # each GPU from every rank.
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    info = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, [int(k) for k in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, info


def rank_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any], rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The RNG states a rank saved (ranks above 0 under "rng.rank<r>."), or rank 0's where it saved none."""
    prefix = f"rng.rank{rank}."
    own = {"rng." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    ranks = state.get("rng_ranks") or {}
    if rank > 0 and own and str(rank) in ranks:
        return own, ranks[str(rank)]
    return {k: v for k, v in tensors.items() if k.startswith("rng.") and not k.startswith("rng.rank")}, state["rng"]


def restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))]
    if cuda and torch.cuda.is_available():  # checkpoints written before: one state per visible device
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = info["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- optimiser
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into named tensors and a JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


# --------------------------------------------------------------------------- publish / load
def save_training_checkpoint(
    directory: str | Path, model: CLIP, tokenizer: CLIPTokenizer, meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
    peer_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> str:
    """Write a model checkpoint (with trainer state when optimizer is given) atomically; returns its hash.

    peer_rng: under DDP, every rank's capture_rng() in rank order (rank 0, the writer, first), so each rank
    resumes its own random streams (dropout masks); without it this process's states are captured.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.stage-", dir=directory.parent))
    try:
        inner = staging / "ckpt"
        digest = save_checkpoint(inner, model, tokenizer, meta)
        if optimizer is not None:
            tensors, optim_info = optimizer_to_flat(optimizer)
            (rng_tensors, rng_info), *others = peer_rng or [capture_rng()]
            tensors.update(rng_tensors)
            rng_ranks: dict[str, Any] = {}
            for rank, (peer_tensors, peer_info) in enumerate(others, start=1):
                tensors.update({f"rng.rank{rank}." + k[len("rng."):]: v for k, v in peer_tensors.items()})
                rng_ranks[str(rank)] = peer_info
            save_file(tensors, str(inner / STATE_TENSORS), metadata={"format": "clipforge-trainer"})
            payload = {"format_version": FORMAT_VERSION, "content_hash": digest, "optimizer": optim_info,
                       "rng": rng_info, "rng_ranks": rng_ranks, **(state or {})}
            (inner / STATE_JSON).write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
        publish_directory(inner, directory)
        return digest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_trainer_state(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / STATE_TENSORS).is_file() and (d / STATE_JSON).is_file()


def find_resumable(directory: str | Path) -> Path | None:
    """directory if it holds a complete training checkpoint, else the newest swapped-out copy of it."""
    directory = Path(directory)
    if has_trainer_state(directory):
        return directory
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    for old in reversed(olds):
        if has_trainer_state(old):
            return old
    return None


def load_trainer_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainer tensors and JSON of a training checkpoint, checked against its model files."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
        info = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"training state in {directory} cannot be read: {exc}") from exc
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"training state in {directory} has unknown format {info.get('format_version')!r}")
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    if meta.get("content_hash") != info.get("content_hash"):
        raise CheckpointError(f"training state in {directory} does not belong to the model saved beside it")
    return tensors, info


def prune_step_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step-NNNNNNNN checkpoints."""
    steps = sorted(Path(folder).glob("step-*"))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
