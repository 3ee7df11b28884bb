"""`clipforge eval`: evaluate a saved checkpoint on a data set and store the report in its meta.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from model import load_checkpoint, read_meta, update_meta
from model.errors import ClipforgeError

from .evaluate import evaluate


def evaluate_checkpoint(
    checkpoint: str | Path, data: str, max_samples: int | None = None, batch_size: int = 256, device: str = "auto",
    num_workers: int = 2, write_meta: bool = True,
) -> dict[str, Any]:
    """Metrics of a checkpoint on `data`; with write_meta they go into meta.json under "metrics".

    Labelled data also records its class names and templates in meta.json, so the service
    offers them as default zero-shot labels.
    """
    from training.data import load_records, parse_data_spec

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClipforgeError("device cuda was requested but no CUDA GPU is available")
    model, tokenizer, _ = load_checkpoint(checkpoint, device=dev)
    rs = load_records(parse_data_spec(data), max_samples)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    t0 = time.monotonic()
    metrics = evaluate(model, tokenizer, rs.records, dev, class_names=rs.class_names, templates=rs.templates,
                       loss_batch_size=min(batch_size, 128), batch_size=batch_size, num_workers=num_workers,
                       autocast_dtype=amp)
    if metrics.get("n_images", 0) == 0:
        raise ClipforgeError(f"none of the {len(rs.records)} images of {data} could be read")
    report = {"data": data, "dataset": rs.name, "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(time.monotonic() - t0, 2), **metrics}
    if write_meta:
        meta = read_meta(checkpoint)
        evaluations = dict(meta.get("evaluations") or {})
        evaluations[rs.name] = report
        changes: dict[str, Any] = {"metrics": report, "evaluations": evaluations}
        if rs.class_names:
            changes["class_names"] = list(rs.class_names)
            changes["templates"] = list(rs.templates or [])
        update_meta(checkpoint, **changes)
    return report
