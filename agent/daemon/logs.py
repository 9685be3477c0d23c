"""Logging setup: one JSON object per line for journald and files, a readable line on a terminal.

JSON lines carry ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, then every ``extra=``
field of the call, then ``exc_type``/``exc`` for exceptions. When stderr is connected to the
journal (systemd sets ``JOURNAL_STREAM`` to its device and inode), each line is prefixed with the
syslog priority (``<3>`` for errors) so ``journalctl -p warning`` filters by level.

Tracebacks are rendered by the standard library without local variables. That is a guarantee
tests hold the formatters to: a frame's locals may hold key material, and logs leave the device.
As a last net, PEM private-key blocks are replaced by ``[redacted private key]``; that net is no
substitute for never passing secrets to a log call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["HumanFormatter", "JsonLineFormatter", "configure_logging", "redact"]

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}
_RESERVED = ("ts", "level", "logger", "msg", "exc_type", "exc", "stack")
_PEM_PRIVATE = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_HANDLER_MARK = "_edge_agent_handler"


def redact(text: str) -> str:
    """Replace PEM private-key blocks (even truncated ones) with a marker."""
    return _PEM_PRIVATE.sub("[redacted private key]", text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD_ATTRS or key.startswith("_"):
            continue
        out[f"{key}_" if key in _RESERVED else key] = value
    return out


def _json_value(value: object) -> object:
    """Fallback for values json cannot encode: their ``str``, bounded."""
    text = str(value)
    return text if len(text) <= 1000 else text[:997] + "..."


def _syslog_priority(levelno: int) -> int:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return _SYSLOG_PRIORITY[logging.DEBUG]


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self._syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single-line JSON object (optionally with a ``<priority>`` prefix)."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _extras(record).items():
            out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        line = json.dumps(out, default=_json_value, ensure_ascii=False, separators=(",", ":"))
        if self._syslog_prefix:
            return f"<{_syslog_priority(record.levelno)}>{line}"
        return line


class HumanFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` plus the traceback, for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as readable text; exceptions on the following lines."""
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        extras = " ".join(f"{k}={v!r}" for k, v in _extras(record).items())
        if extras:
            text = f"{text} {extras}"
        if record.exc_info and record.exc_info[0] is not None:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return redact(text)


def _stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO has no usable fileno()
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure_logging(
    *,
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
    json_lines: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Install the agent's handler on the root logger (replacing one installed before).

    Args:
        level: root level, a number or a name such as ``"DEBUG"``.
        stream: where to write (default: stderr).
        json_lines: force JSON (True) or human (False); default: JSON unless ``stream`` is a
            terminal.
        environ: environment for ``JOURNAL_STREAM`` detection (default: ``os.environ``).

    Returns:
        The installed handler.
    """
    target = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    if json_lines is None:
        json_lines = not (hasattr(target, "isatty") and target.isatty())
    handler = logging.StreamHandler(target)
    if json_lines:
        handler.setFormatter(JsonLineFormatter(syslog_prefix=_stream_is_journal(target, env)))
    else:
        handler.setFormatter(HumanFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    return handler
