"""`clipforge train`, `clipforge eval` and `clipforge tune`.

Every TrainConfig field is also a flag (--batch-size, --no-tensorboard, ...), generated
from the config model so the two never drift apart; --set KEY=VALUE overrides model
config fields. Precedence: defaults < --config TOML < flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from model.errors import ClipforgeError, ConfigError

from .config import (
    TrainConfig,
    load_config,
    load_saved_config,
    merge,
    parse_model_override,
)

_SKIP = {"model"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default None (= not given, so the TOML/default value stands)."""
    group = parser.add_argument_group("training settings (also accepted as keys of the --config TOML file)")
    for name, field in TrainConfig.model_fields.items():
        if name in _SKIP:
            continue
        help_text = field.description or ""
        ann = field.annotation
        args = typing.get_args(ann)
        base = next((a for a in args if a is not type(None)), ann) if args and type(None) in args else ann
        if base is bool:
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            group.add_argument(_flag(name), dest=name, choices=list(typing.get_args(base)), default=None, help=help_text)
        elif base in (int, float, str):
            group.add_argument(_flag(name), dest=name, type=base, default=None, metavar=name.upper(), help=help_text)
    group.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model config field, e.g. --set img_dim=192 (repeatable)")


def _given_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: getattr(args, name) for name in TrainConfig.model_fields
           if name not in _SKIP and getattr(args, name, None) is not None}
    if args.model_set:
        out["model"] = dict(parse_model_override(s) for s in args.model_set)
    return out


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    if args.plot:
        from .plots import write_plots

        for path in write_plots(args.plot):
            print(path)
        return 0
    overrides = _given_overrides(args)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_FOLDER (the run to continue)")
        base = load_saved_config(args.out).model_dump()
        if args.config:
            from .config import read_toml

            base = merge(base, read_toml(args.config))
        from .config import build_config

        cfg = build_config(merge(base, overrides))
    else:
        cfg = load_config(args.config, overrides)
    from .loop import train

    metrics = train(cfg, resume=args.resume)
    if metrics and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    if args.image is not None or args.texts is not None:
        return _demo(args)
    if not args.data:
        raise ConfigError("eval needs --data SPEC (or --image IMG --texts ... for the demo)")
    from .eval_report import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, args.data, max_samples=args.max_samples, batch_size=args.batch_size,
        device=args.device, num_workers=args.num_workers, write_meta=args.write_meta,
    )
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.image or not args.texts:
        raise ConfigError("the demo needs both --image IMG and --texts TEXT [TEXT ...]")
    from model import CLIPInference
    from model.device import resolve_device

    clip = CLIPInference.load(args.checkpoint, device=resolve_device(args.device))
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image} does not exist")
    rows = clip.rank_texts(args.image, args.texts)
    width = max(len(r["text"]) for r in rows)
    for r in rows:
        print(f"{r['text']:<{width}}  p={r['probability']:.4f}  cos={r['similarity']:+.4f}")
    return 0


# --------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each rank would draw its own trial (different model shapes) and only rank 0 sees the metrics.
        raise ClipforgeError("clipforge tune runs trials in one process; run it without torchrun")
    cfg = load_config(args.config, _given_overrides(args))
    from .tune import SearchSpace, run_study

    space = SearchSpace.from_toml(args.space) if args.space else SearchSpace()
    result = run_study(cfg, cfg.out, study_name=args.study, n_trials=args.trials, metric=args.metric,
                       timeout_s=args.timeout, space=space)
    print(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- parsers
def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a CLIP model",
                           description="Train a CLIP model: from scratch, fine-tuned from a checkpoint "
                                       "(--init-checkpoint), or on pretrained transformers towers "
                                       "(--image-tower/--text-tower hf:DIR).")
    train.add_argument("--config", help="TOML file of training settings (flags override it)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--plot", metavar="RUN", help="only (re)draw the PNG plots of a run folder, then exit")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (or score texts for one image)",
                        description="Retrieval recall@k, zero-shot accuracy and val loss of a checkpoint on a data set; "
                                    "the report is stored in the checkpoint's meta.json.")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory")
    ev.add_argument("--data", help="data spec to evaluate on")
    ev.add_argument("--max-samples", type=int, default=None, help="evaluate the first N images only")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, "
                                                   "cuda or cuda:N")
    ev.add_argument("--num-workers", type=int, default=2)
    ev.add_argument("--json", metavar="PATH", help="also write the report to this file")
    ev.add_argument("--write-meta", action=argparse.BooleanOptionalAction, default=True,
                    help="store the report in the checkpoint's meta.json (default: yes)")
    ev.add_argument("--image", help="demo: one image to score --texts against")
    ev.add_argument("--texts", nargs="+", help="demo: candidate texts")
    ev.set_defaults(func=cmd_eval)

    tune = sub.add_parser("tune", help="hyperparameter search with Optuna",
                          description="Search lr, temperature, batch size, weight decay, depth, width and dropout; "
                                      "--out is the folder for the study database, trials and results.")
    tune.add_argument("--config", help="TOML file of base training settings")
    tune.add_argument("--study", default="clipforge", help="study name (rerun with the same name to continue it)")
    tune.add_argument("--trials", type=int, default=10, help="trials to run in this invocation")
    tune.add_argument("--metric", default="auto", help="validation metric to maximise (losses are minimised)")
    tune.add_argument("--space", help="TOML file narrowing the search ranges (keys: lr, init_temperature, weight_decay, "
                                      "batch_size, width, head_dim, img_layers, text_layers, dropout)")
    tune.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    _add_config_flags(tune)
    tune.set_defaults(func=cmd_tune)


def main(argv: list[str] | None = None) -> int:
    """Entry for `python -m training.cli ...` (torchrun uses it): the same commands as `clipforge`."""
    import clipforge_cli

    return clipforge_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
