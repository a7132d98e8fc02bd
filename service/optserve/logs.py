"""Logging: one JSON object per line on stderr (or plain text), each tagged with its request's id.

The request id lives in a context variable set by the API's request middleware, so any log
record made while a request is handled (in the engine, the store, a worker thread started with
anyio) carries it without being passed around. uvicorn's loggers go through the same handler;
its access log is replaced by the API's own access line (api/request_log.py).

A hand-written formatter rather than python-json-logger: it is twenty lines on orjson (already a
dependency), and the key set is fixed here instead of renamed and filtered out of a generic one.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

#: The id of the request being handled, or None outside a request.
request_id: ContextVar[str | None] = ContextVar("optserve_request_id", default=None)

LogFormat = Literal["json", "text"]

#: Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's coloured duplicate of the message
    "taskName",
}


class RequestIdFilter(logging.Filter):
    """Stamp each record with the current request's id (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "request_id"?, extra fields..., "exception"?}."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def logging_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """A dictConfig for the server (passed to uvicorn as its log_config): optserve's and
    uvicorn's loggers at `level`, everything else at warning, one stderr handler."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "optserve": {"level": level},
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            # replaced by optserve.access (api/request_log.py): one line per request, with its id
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }
