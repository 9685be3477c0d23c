"""``edge-agent run``: run a local model on a camera, stream, video, image folder or sensor feed.

The model file is read into memory and loaded from bytes. Its card is ``--card`` or, when that
is not given, ``MODEL.card.json`` next to the model if present; without a card, preprocessing is
derived from the model's input tensor and outputs are reported raw. Results go to stdout (one
readable line per result, or one JSON object per line with ``--json``) and a summary follows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent.cli import CliError

if TYPE_CHECKING:
    from agent.modelcard import ModelCard
    from agent.pipeline.loop import FrameLoop, FrameResult, LoopStats
    from agent.pipeline.predictor import Predictor, PreprocessOverrides
    from agent.runtime.base import Model

__all__ = ["ResultPrinter", "describe_payload", "format_summary", "register"]

logger = logging.getLogger(__name__)

_EPILOG = """\
sources: a camera index (0) or /dev/videoN; rtsp:// or http(s):// URL; a video file; a folder of
images; a sensor file (.csv with a header row, or .ndjson) or FIFO; serial:///dev/ttyUSB0?baud=N;
- for stdin. Files are processed frame by frame; live sources drop stale frames (--realtime makes a
file behave like a camera: paced at its frame rate, stale frames dropped).

output: without --json, a live line per result and a summary on stdout. With --json, stdout has
one JSON object per result (frame, ts, latency_ms and the payload: top / detections /
score+anomaly / outputs) and the summary goes to stderr as one JSON line {"summary": {...}}.

exit status: 0 done; 2 usage, config, model or source error (one line on stderr); 130 on Ctrl-C
(after the summary).
"""

_TEXT_REFRESH_S = 0.05  # on a terminal, redraw the live line at most 20 times a second


def register(subparsers: Any) -> None:
    """Add the ``run`` sub-command."""
    parser = subparsers.add_parser(
        "run",
        help="run a model on a camera, stream, video, image folder or sensor feed",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="PATH", help=".tflite or .onnx file")
    parser.add_argument("--source", required=True, metavar="SRC", help="input (see below)")
    parser.add_argument("--card", metavar="CARD.json", help="model card (default: PATH.card.json)")
    parser.add_argument("--frames", type=_positive_int, metavar="N", help="stop after N results")
    parser.add_argument("--json", action="store_true", help="one JSON object per result line")
    parser.add_argument("--loop", action="store_true", help="restart a file or folder at its end")
    parser.add_argument("--realtime", action="store_true", help="drop stale frames, pace files")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="runtime threads")
    parser.add_argument("--providers", metavar="P,...", help="ONNX Runtime execution providers")
    parser.add_argument(
        "--tflite-runtime",
        choices=("auto", "ai_edge_litert", "tflite_runtime"),
        default="auto",
        help="which TFLite interpreter package to use",
    )
    group = parser.add_argument_group("preprocessing overrides (bring your own model)")
    group.add_argument("--size", type=_size, metavar="WxH", help="resize frames to W x H")
    group.add_argument("--color", choices=("RGB", "BGR", "GRAY"), help="channel order")
    group.add_argument("--layout", choices=("NHWC", "NCHW", "NTC", "NCT"), help="tensor layout")
    group.add_argument("--scale", type=float, metavar="F", help="pixel multiplier")
    group.add_argument("--mean", type=_floats, metavar="a,b,c", help="per-channel mean")
    group.add_argument("--std", type=_floats, metavar="a,b,c", help="per-channel std")
    parser.set_defaults(func=run_command)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or min(int(width), int(height)) < 1:
        raise argparse.ArgumentTypeError(f"expected WxH such as 224x224, got {text!r}")
    return int(width), int(height)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.5,0.5, got {text!r}"
        ) from None
    return values


def _read_card(model_path: Path, card_arg: str | None) -> ModelCard | None:
    from agent.modelcard import ModelCardError, card_from_json  # noqa: PLC0415

    if card_arg is not None:
        card_path = Path(card_arg)
        if not card_path.is_file():
            raise CliError(f"card file not found: {card_arg}")
    else:
        card_path = model_path.with_name(model_path.name + ".card.json")
        if not card_path.is_file():
            return None
    try:
        return card_from_json(card_path.read_bytes())
    except ModelCardError as exc:
        raise CliError(f"{card_path}: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot read card {card_path}: {exc.strerror}") from None


def _load_model(args: argparse.Namespace, card: ModelCard | None) -> Model:
    from agent.runtime import ModelRuntimeError, RuntimeOptions, load_model  # noqa: PLC0415

    path = Path(args.model)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"model file not found: {args.model}") from None
    except OSError as exc:
        raise CliError(f"cannot read model {args.model}: {exc.strerror}") from None
    try:
        providers = tuple(p for p in (args.providers or "").split(",") if p)
        options = RuntimeOptions(
            threads=args.threads or 0,
            tflite_runtime=args.tflite_runtime,
            onnx_providers=providers or RuntimeOptions().onnx_providers,
        )
        with _native_stderr_to_log():
            model = load_model(data, options=options)
    except ModelRuntimeError as exc:
        raise CliError(f"model {args.model}: {exc}") from None
    if card is not None and card.format != model.format:
        raise CliError(
            f"card.format: expected {model.format!r} for {args.model}, got {card.format!r}"
        )
    if card is not None:
        _check_card_inputs(card, model)
    return model


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Route what native runtimes print on fd 2 while loading (banners) to DEBUG logging.

    Keeps stderr to what the user must see: errors are exactly one line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read(64 * 1024).decode("utf-8", "replace").splitlines():
                logger.debug("runtime: %s", line)


def _check_card_inputs(card: ModelCard, model: Model) -> None:
    if card.inputs and len(card.inputs) != len(model.inputs):
        raise CliError(
            f"card.inputs: expected {len(model.inputs)} tensors like the model, "
            f"got {len(card.inputs)}"
        )
    for index, (info, spec) in enumerate(zip(card.inputs, model.inputs, strict=False)):
        fits = len(info.shape) == len(spec.shape) and all(
            a == b or -1 in (a, b) for a, b in zip(info.shape, spec.shape, strict=True)
        )
        if not fits:
            raise CliError(
                f"card.inputs[{index}].shape: expected {list(spec.shape)} (the model's "
                f"'{spec.name}'), got {list(info.shape)}"
            )


def _overrides(args: argparse.Namespace) -> PreprocessOverrides | None:
    from agent.pipeline.predictor import PreprocessOverrides  # noqa: PLC0415

    values = {
        "size": args.size,
        "color": args.color,
        "layout": args.layout,
        "scale": args.scale,
        "mean": args.mean,
        "std": args.std,
    }
    if all(v is None for v in values.values()):
        return None
    return PreprocessOverrides(**values)


def _build_predictor(args: argparse.Namespace) -> Predictor:
    from agent.pipeline.predictor import Predictor  # noqa: PLC0415
    from agent.pipeline.results import PredictorError  # noqa: PLC0415

    card = _read_card(Path(args.model), args.card)
    model = _load_model(args, card)
    try:
        return Predictor(model, card, overrides=_overrides(args))
    except PredictorError as exc:
        raise CliError(str(exc)) from None


def describe_payload(payload: dict[str, Any]) -> str:
    """A short human-readable rendering of a result payload."""
    if "top" in payload:
        parts = [
            f"{c.get('label') or c.get('index')} ({float(c.get('score', 0.0)):.2f})"
            for c in payload["top"]
        ]
        return "top " + ", ".join(parts)
    if "detections" in payload:
        found = payload["detections"]
        if not found:
            return "no detections"
        best = max(found, key=lambda d: float(d.get("score", 0.0)))
        box = ",".join(f"{v:.0f}" for v in best.get("box", []))
        return f"{len(found)} detections, best {best.get('label', '')} {best['score']:.2f} [{box}]"
    if "anomaly" in payload:
        verdict = "ANOMALY" if payload["anomaly"] else "normal"
        return f"score {float(payload['score']):.3f} {verdict}"
    outputs = payload.get("outputs", [])
    return "outputs " + " ".join(f"{o.get('name')}{o.get('shape')}" for o in outputs)


class ResultPrinter:
    """The sink: JSON lines, or a live line (overwritten in place on a terminal)."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.tty = out.isatty()
        self._last_draw = 0.0
        self._pending = ""

    def __call__(self, result: FrameResult) -> None:
        if self.as_json:
            self.out.write(json.dumps(result.as_dict(), separators=(",", ":")) + "\n")
            self.out.flush()
            return
        line = (
            f"frame {result.frame}  {describe_payload(result.payload)}  {result.latency_ms:.1f} ms"
        )
        if not self.tty:
            self.out.write(line + "\n")
            return
        now = time.monotonic()
        self._pending = line
        if now - self._last_draw >= _TEXT_REFRESH_S:
            self._draw()
            self._last_draw = now

    def _draw(self) -> None:
        self.out.write("\r" + self._pending + "\x1b[K")
        self.out.flush()
        self._pending = ""

    def finish(self) -> None:
        if self.tty and not self.as_json:
            if self._pending:
                self._draw()
            self.out.write("\n")
        self.out.flush()


def format_summary(stats: LoopStats, source: str) -> str:
    """The closing summary: counts, rate and per-stage latency percentiles."""
    lines = [
        f"source {source}",
        f"frames {stats.results_out} in {stats.duration:.2f} s ({stats.fps:.1f} fps); "
        f"dropped {stats.dropped}; errors: inference {stats.inference_errors}, "
        f"source {stats.source_errors}, malformed lines {stats.malformed}",
        f"{'latency ms':<14}{'p50':>9}{'p95':>9}{'p99':>9}",
    ]
    for name, histogram in stats.histograms.items():
        s = histogram.summary()
        lines.append(f"  {name:<12}{s.p50_ms:>9.3f}{s.p95_ms:>9.3f}{s.p99_ms:>9.3f}")
    return "\n".join(lines)


def _print_summary(loop: FrameLoop, *, as_json: bool) -> None:
    stats = loop.stats
    if as_json:
        summary = {"source": loop.source.describe(), **stats.as_dict()}
        sys.stderr.write(json.dumps({"summary": summary}, separators=(",", ":")) + "\n")
        sys.stderr.flush()
    else:
        sys.stdout.write(format_summary(stats, loop.source.describe()) + "\n")
        sys.stdout.flush()


class _LevelFormatter(logging.Formatter):
    """``edge-agent: warning: message``, like the CLI's own error lines."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        text = f"edge-agent: {record.levelname.lower()}: {record.message}"
        if record.exc_info and record.levelno < logging.ERROR:
            return text  # frame failures: the message says enough; tracebacks at DEBUG
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def run_command(args: argparse.Namespace) -> int:
    """Run the model until the source ends, ``--frames`` results, or Ctrl-C."""
    from agent.modelcard import SensorPreprocess  # noqa: PLC0415
    from agent.pipeline.loop import FrameLoop  # noqa: PLC0415
    from agent.pipeline.sources import SourceError, parse_source  # noqa: PLC0415

    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_LevelFormatter())
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
    predictor = _build_predictor(args)
    preprocess = predictor.card.preprocess
    sensor = preprocess if isinstance(preprocess, SensorPreprocess) else None
    try:
        source = parse_source(args.source, loop=args.loop, sensor=sensor)
        source.open()
    except SourceError as exc:
        raise CliError(str(exc)) from None
    printer = ResultPrinter(sys.stdout, as_json=args.json)
    loop = FrameLoop(
        source, predictor, printer, realtime=True if args.realtime else None, max_frames=args.frames
    )
    interrupted = False
    try:
        loop.start()
        while not loop.wait(0.25):
            pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        loop.stop()
        printer.finish()
    _print_summary(loop, as_json=args.json)
    if interrupted:
        return 130
    if loop.failure is not None:
        return 2  # the loop has logged the one-line reason as an error
    stats = loop.stats
    if stats.results_out == 0 and stats.inference_errors:
        raise CliError(f"every frame failed: {loop.last_error}")
    return 0
