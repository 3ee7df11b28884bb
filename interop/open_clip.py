"""`model import open_clip:PATH`: open_clip and OpenAI CLIP weights -> a transformers CLIP folder -> a checkpoint.

The source is read as data (interop.open_clip_source), checked and mapped onto transformers'
CLIPModel layout (interop.open_clip_mapping) with CLIP's tokenizer files
(interop.open_clip_tokenizer); interop.hf turns that folder into a checkpoint, so both
import paths share one mapping into clipforge.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from interop.open_clip_archs import BPE_NAME  # noqa: F401 - `from interop.open_clip import BPE_NAME` (bench/peer_weights.py)
from interop.open_clip_mapping import (
    check_preprocess,
    check_supported,
    check_weights,
    hf_config,
    hf_state_dict,
    preprocessor_config,
)
from interop.open_clip_source import read_source, refuse_unmapped_keys
from interop.open_clip_tokenizer import write_tokenizer


def convert_to_hf(src: str | Path, out_dir: str | Path, *, arch: str | None = None) -> dict[str, Any]:
    """Write a transformers CLIPModel folder for an open_clip source; returns the provenance for the checkpoint."""
    source = read_source(src, arch=arch)
    check_supported(source.model_cfg)
    refuse_unmapped_keys(source.state_dict, source.name_or_path)
    pp = dict(source.preprocess_cfg)
    check_preprocess(pp)
    what = arch or (Path(source.name_or_path).name + "'s config")
    check_weights(source.state_dict, source.model_cfg, what=what)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(hf_state_dict(source.state_dict, source.model_cfg), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(source.model_cfg), indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(source.model_cfg, pp), indent=2), encoding="utf-8"
    )
    write_tokenizer(source.folder, out)
    return {"format": "open_clip", "name_or_path": source.name_or_path, "arch": source.arch, "license": source.license}


# What a transformers folder cannot say of open_clip's preprocessing, given to the checkpoint beside it:
# torchvision's CenterCrop rounds the crop offset (CLIPImageProcessor floors it), and open_clip's
# tokenizer runs ftfy and unescapes HTML before BPE (transformers' CLIPTokenizer does neither).
OPEN_CLIP_CONFIG = {"image_crop_offset": "round"}
OPEN_CLIP_CLEANING = "open_clip"


def import_open_clip(src: str | Path, out: str | Path, arch: str | None = None) -> str:
    """`clipforge model import open_clip:PATH --out CKPT`: through a transformers folder into a checkpoint; its hash."""
    from interop.hf import import_hf

    with tempfile.TemporaryDirectory(prefix="open_clip-") as tmp:
        provenance = convert_to_hf(src, tmp, arch=arch)
        return import_hf(tmp, out, source={k: v for k, v in provenance.items() if v is not None},
                         config_changes=OPEN_CLIP_CONFIG, cleaning=OPEN_CLIP_CLEANING)
