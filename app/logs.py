"""Structured logs: one JSON object per line, each carrying the id of the request that caused it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys

from model.fileio import utc_timestamp

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("clipforge_request_id", default="-")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """ts, level, logger, message, request_id, plus any `extra=` fields, as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": utc_timestamp(record.created).removesuffix("Z") + f".{int(record.msecs):03d}Z",  # to the millisecond
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data and key != "color_message":
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for clipforge and uvicorn loggers (uvicorn's access log is replaced by ours)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    for name in ("clipforge", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
