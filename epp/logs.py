"""Structured logging: one JSON object per line (or key=value text), with the `extra` fields.

The reference's zap flags map here: `--zap-encoder console` is the text format,
`--zap-time-encoding` chooses how `ts` is written, `--zap-stacktrace-level` adds the call stack
to records at that level and above.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_STACK_LEVELS = {"info": logging.INFO, "error": logging.ERROR, "panic": logging.CRITICAL}
TIME_ENCODINGS = ("iso8601", "epoch", "millis", "nano", "rfc3339", "rfc3339nano")


def _ts(record: logging.LogRecord, encoding: str) -> object:
    if encoding == "epoch":
        return record.created
    if encoding == "millis":
        return record.created * 1000.0
    if encoding == "nano":
        return int(record.created * 1e9)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    if encoding == "rfc3339":
        return base + "Z"
    if encoding == "rfc3339nano":
        return base + f".{int((record.created % 1) * 1e9):09d}Z"
    return base + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """`{"ts":..., "level":..., "logger":..., "msg":..., <extra fields>}`."""

    def __init__(self, time_encoding: str = "iso8601", stack_level: int | None = None) -> None:
        super().__init__()
        self.time_encoding = time_encoding or "iso8601"
        self.stack_level = stack_level

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _ts(record, self.time_encoding),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif self.stack_level is not None and record.levelno >= self.stack_level:
            out["stacktrace"] = _stack()
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`LEVEL logger: msg key=value ...` for people reading a terminal."""

    def __init__(self, stack_level: int | None = None) -> None:
        super().__init__()
        self.stack_level = stack_level

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_"))
        line = f"{record.levelname[0]} {record.name}: {record.getMessage()}" + (f" {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif self.stack_level is not None and record.levelno >= self.stack_level:
            line += "\n" + _stack()
        return line


def _stack() -> str:
    # drop the logging machinery's own frames: the stack ends at the caller of log.error()
    frames = [f for f in traceback.extract_stack()
              if "/logging/" not in f.filename and not f.filename.endswith("epp/logs.py")]
    return "".join(traceback.format_list(frames)).rstrip()


def setup(level: str = "info", fmt: str = "json", *, time_encoding: str = "", stacktrace_level: str = "") -> None:
    """Configure the root logger once, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    stack = _STACK_LEVELS.get(stacktrace_level) if stacktrace_level else None
    handler.setFormatter(JsonFormatter(time_encoding, stack) if fmt == "json" else TextFormatter(stack))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp access logs are per request: keep them out of INFO
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
