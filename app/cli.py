"""`clipforge serve`: run the web service under uvicorn. Flags override CLIPFORGE_* environment variables.

API keys are read from CLIPFORGE_API_KEYS only, never from flags, so they do not show up in `ps`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import PRECISION_NAMES

if TYPE_CHECKING:
    from .limits import ServingLimits
    from .settings import Settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .lifespan import load_service
    from .limits import load_limits
    from .logs import configure_logging
    from .main import create_app
    from .settings import load_settings

    settings = load_settings(
        checkpoint=args.checkpoint, index=args.index, onnx=args.onnx, host=args.host, port=args.port, labels_file=args.labels_file,
        device=args.device, precision=args.precision, threads=args.threads, batching=args.batching, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        protect_reads=args.protect_reads, cors_origins=args.cors_origin, log_level=args.log_level,
    )
    limits = load_limits()
    configure_logging(settings.log_level)
    app = create_app(settings, limits)
    load_service(app.state.service)  # a bad checkpoint or index fails here with one clear line, before binding
    uvicorn.run(app, **uvicorn_options(settings, limits))
    return 0


def uvicorn_options(settings: Settings, limits: ServingLimits | None = None) -> dict[str, Any]:
    """uvicorn.run's keywords for these settings (and limits: the CLIPFORGE_* environment's by default).

    The shutdown timeout passes through as given (uvicorn hands it to asyncio.wait_for, which takes
    any float): rounding it down would turn 0.5 into 0, which uvicorn reads as "wait forever". The
    protocol is httptools with app/connections.py's head deadline, head size cap and connection cap, on
    asyncio's own loop (under uvloop the crawling-body test failed 7 of 22 runs on a loaded machine).
    """
    from .connections import protocol_for
    from .limits import load_limits

    limits = limits if limits is not None else load_limits()
    return {
        "http": protocol_for(limits, max_head_bytes=settings.max_head_bytes), "loop": "asyncio",
        "host": settings.host, "port": settings.port, "log_config": None, "access_log": False, "lifespan": "on",
        "timeout_graceful_shutdown": settings.shutdown_timeout_s, "server_header": False,
    }


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve a checkpoint (and an index) over HTTP",
        description="Serve embeddings, similarity, zero-shot classification and search over HTTP. Every flag "
                    "can also be set as CLIPFORGE_<NAME> (e.g. CLIPFORGE_CHECKPOINT); API keys only as "
                    "CLIPFORGE_API_KEYS (comma-separated).",
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (CLIPFORGE_CHECKPOINT)")
    parser.add_argument("--index", type=Path, help="index directory, milvus:// location or location file "
                                                   "(CLIPFORGE_INDEX); without it search answers 503")
    parser.add_argument("--onnx", type=Path, help="encode with onnxruntime from this ONNX export of the checkpoint "
                                                  "(`clipforge model export CKPT --to onnx:DIR`; CLIPFORGE_ONNX)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000)")
    parser.add_argument("--labels-file", type=Path, help="default zero-shot labels, one per line")
    parser.add_argument("--device", help="torch device: cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--precision", choices=PRECISION_NAMES,
                        help="torch forward passes in fp32 (default) or bf16, faster on CPUs with AMX or "
                             "AVX512-BF16 (CLIPFORGE_PRECISION)")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and FAISS (default: all cores)")
    parser.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None,
                        help="coalesce concurrent encodes into one forward pass (default on)")
    parser.add_argument("--max-batch-size", type=int, help="most items per forward pass (default 32)")
    parser.add_argument("--max-wait-ms", type=float, help="longest wait for a batch to fill (default 2)")
    parser.add_argument("--protect-reads", action=argparse.BooleanOptionalAction, default=None,
                        help="require an API key for reads too")
    parser.add_argument("--cors-origin", action="append", help="allowed CORS origin (repeatable)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.set_defaults(func=cmd_serve)
