"""`clipforge eval`: evaluate a saved checkpoint on a data set and store the report in its meta.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from model import load_checkpoint, read_meta, update_meta
from model.device import resolve_device
from model.errors import ClipforgeError
from model.fileio import utc_timestamp

from .evaluate import evaluate


def evaluate_checkpoint(
    checkpoint: str | Path, data: str, *, max_samples: int | None = None, batch_size: int = 256,
    device: str = "auto", num_workers: int = 2, write_meta: bool = True,
) -> dict[str, Any]:
    """Metrics of a checkpoint on `data`; with write_meta they go into meta.json under "metrics".

    Labelled data also records its class names and templates in meta.json, so the service
    offers them as default zero-shot labels.
    """
    from training.data import load_records, parse_data_spec

    torch_device = resolve_device(device)
    model, tokenizer, _ = load_checkpoint(checkpoint, device=torch_device)
    data_set = load_records(parse_data_spec(data), max_samples)
    autocast_dtype = torch.bfloat16 if torch_device.type == "cuda" else None
    started = time.monotonic()
    metrics = evaluate(model, tokenizer, data_set.records, torch_device, class_names=data_set.class_names,
                       templates=data_set.templates, loss_batch_size=min(batch_size, 128), batch_size=batch_size,
                       num_workers=num_workers, autocast_dtype=autocast_dtype)
    if metrics.get("n_images", 0) == 0:
        raise ClipforgeError(f"none of the {len(data_set.records)} images of {data} could be read")
    report = {"data": data, "dataset": data_set.name, "evaluated": utc_timestamp(),
              "seconds": round(time.monotonic() - started, 2), **metrics}
    if write_meta:
        meta = read_meta(checkpoint)
        evaluations = dict(meta.get("evaluations") or {})
        evaluations[data_set.name] = report
        changes: dict[str, Any] = {"metrics": report, "evaluations": evaluations}
        if data_set.class_names:
            changes["class_names"] = list(data_set.class_names)
            changes["templates"] = list(data_set.templates or [])
        update_meta(checkpoint, **changes)
    return report
