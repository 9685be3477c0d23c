"""Logging setup: JSON lines off a terminal, human text on one, journald priorities, no locals."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.logs import HumanFormatter, JsonLineFormatter, configure_logging, redact

SECRET = "s3cr3t-LOCAL-value-7f9a"
PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEIH3x\n-----END PRIVATE KEY-----"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _unseal(blob: bytes) -> None:
    content_key = SECRET  # a local a traceback printer with locals would show
    if blob != content_key.encode():
        raise ValueError("grant does not open with this device key")


def _emit_exception(logger: logging.Logger) -> None:
    try:
        _unseal(b"wrong")
    except ValueError:
        logger.exception("unseal failed", extra={"target": "model-v3"})


def test_json_line_fields_and_extras() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, level="DEBUG")
    log = logging.getLogger("agent.test")
    log.info("model %s activated\nsecond line", "v3", extra={"version": 3, "ok": True})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1  # embedded newlines stay escaped in the one JSON line
    record = json.loads(lines[0])
    assert record["level"] == "info" and record["logger"] == "agent.test"
    assert record["msg"] == "model v3 activated\nsecond line"
    assert record["version"] == 3 and record["ok"] is True
    assert record["ts"].endswith("Z") and "T" in record["ts"]


def test_extras_never_shadow_core_fields_and_odd_values_become_text() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    logging.getLogger("agent.test").warning(
        "x", extra={"level": "fake", "ts": 0, "path": Path("/var/lib/edge-agent")}
    )
    record = json.loads(stream.getvalue())
    assert record["level"] == "warning" and record["level_"] == "fake" and record["ts_"] == 0
    assert record["path"] == "/var/lib/edge-agent"


def test_json_exception_has_traceback_but_no_locals() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    _emit_exception(logging.getLogger("agent.test"))
    output = stream.getvalue()
    record = json.loads(output)
    assert record["exc_type"] == "ValueError"
    assert "grant does not open with this device key" in record["exc"]
    assert "_unseal" in record["exc"]  # the traceback is there...
    assert SECRET not in output  # ...the frame's locals are not
    assert record["target"] == "model-v3"


def test_human_exception_has_no_locals() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, json_lines=False)
    _emit_exception(logging.getLogger("agent.test"))
    output = stream.getvalue()
    assert "ERROR" in output and "unseal failed target='model-v3'" in output
    assert "Traceback" in output and "ValueError: grant does not open" in output
    assert SECRET not in output


def test_formatters_never_capture_locals_even_for_chained_errors() -> None:
    def outer() -> None:
        outer_key = SECRET + "-outer"  # noqa: F841 - a local that must never be printed
        try:
            _unseal(b"wrong")
        except ValueError as exc:
            raise RuntimeError("activation failed") from exc

    try:
        outer()
    except RuntimeError:
        record = logging.LogRecord("a", logging.ERROR, __file__, 1, "boom", None, None)
        record.exc_info = sys.exc_info()
    for formatter in (JsonLineFormatter(), HumanFormatter()):
        text = formatter.format(record)
        assert "activation failed" in text and "grant does not open" in text
        assert SECRET not in text


def test_human_format_on_a_terminal() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        handler = configure_logging(stream=tty)
        assert isinstance(handler.formatter, HumanFormatter)
        logging.getLogger("agent.test").warning("camera lost", extra={"device": "/dev/video0"})
        tty.flush()
        text = os.read(leader, 4096).decode()
    os.close(leader)
    assert "WARNING agent.test: camera lost device='/dev/video0'" in text
    assert not text.lstrip().startswith("{")


def test_not_a_terminal_means_json(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream:
        handler = configure_logging(stream=stream)
    assert isinstance(handler.formatter, JsonLineFormatter)


def test_journal_stream_gets_syslog_priorities(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        info = os.fstat(stream.fileno())
        configure_logging(
            stream=stream,
            level="DEBUG",
            environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
        )
        log = logging.getLogger("agent.test")
        log.error("broker unreachable")
        log.warning("frame dropped")
        log.info("ready")
        log.debug("tick")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>"]
    assert json.loads(lines[0][3:])["msg"] == "broker unreachable"


def test_other_journal_stream_means_no_prefix(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as stream:
        configure_logging(stream=stream, environ={"JOURNAL_STREAM": "1:2"})
        logging.getLogger("agent.test").error("x")
    assert (tmp_path / "log").read_text().startswith("{")


def test_pem_private_keys_are_redacted() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    logging.getLogger("agent.test").error("bad key file: %s", PEM, extra={"blob": PEM[:40]})
    output = stream.getvalue()
    assert "MC4CAQAwBQYDK2VuBCIEIH3x" not in output
    assert "BEGIN PRIVATE KEY" not in output
    assert json.loads(output)["msg"] == "bad key file: [redacted private key]"
    assert redact("-----BEGIN EC PRIVATE KEY-----\nabc") == "[redacted private key]"
    assert redact("-----BEGIN CERTIFICATE-----\nabc") == "-----BEGIN CERTIFICATE-----\nabc"


def test_configure_twice_replaces_its_handler() -> None:
    first = configure_logging(stream=io.StringIO())
    second = configure_logging(stream=io.StringIO(), level=logging.WARNING)
    root = logging.getLogger()
    assert second in root.handlers and first not in root.handlers
    assert root.level == logging.WARNING
