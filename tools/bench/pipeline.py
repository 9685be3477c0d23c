"""Pipeline benchmark: the agent's frame loop vs a hand-written loop; overhead; memory.

One run, one model (the int8 TFLite digits classifier), the same generated videos:

* frames/s of the agent pipeline (:class:`FrameLoop` + :class:`Predictor`, every frame processed)
  vs a minimal hand-written loop (``cv2.VideoCapture.read``, the same resize and colour
  conversion, a lookup table to the int8 input, the runtime's invoke, argmax), on a light-decode
  video (64x64 frames) and a decode-heavy one (1280x720 MJPG with noise). Runs alternate and
  repeat; medians and the ratio are reported. Targets: >= 0.97x light, >= 1.25x heavy. The
  agent runs the card as shipped (top 3 with softmax and labels); a second light row reports
  the best class only, without softmax: the same work as the hand loop's argmax. The capture
  column says where the agent read frames (``inline`` on the worker, or a capture ``thread``).
* the agent's per-frame overhead outside preprocess and invoke (the worker's time per frame
  minus those two stages, median): postprocess, result delivery and bookkeeping.
* peak resident memory (``ru_maxrss`` from ``wait4``) of a real ``edge-agent run`` process vs a
  bare ``python -c`` that imports numpy, cv2 and the TFLite runtime and loads the same model.
  Target: at most 15 MiB more. For reference, the bare process that also decodes and classifies
  the video by hand (FFmpeg's decoder alone accounts for several MiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.table import median, print_table
from tools.videos import MODELS_DIR, load_digits, write_decode_heavy_video, write_digits_video

MODEL = MODELS_DIR / "digits_int8.tflite"
LIGHT_TARGET = 0.97
HEAVY_TARGET = 1.25
MEMORY_TARGET_MIB = 15.0

# Imports the same libraries and loads the same model; given a video, also decodes and
# classifies it by hand (the same work as the agent, without the agent).
_BARE_SCRIPT = """
import sys
import numpy, cv2
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_content=open(sys.argv[1], "rb").read())
interpreter.allocate_tensors()
interpreter.invoke()
if len(sys.argv) > 2:
    detail = interpreter.get_input_details()[0]
    capture = cv2.VideoCapture(sys.argv[2], cv2.CAP_FFMPEG)
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(gray, (8, 8), interpolation=cv2.INTER_AREA)
        interpreter.set_tensor(detail["index"], (small.astype(numpy.int16) - 128).astype(
            numpy.int8).reshape(1, 8, 8, 1))
        interpreter.invoke()
"""


def hand_loop(video: Path, model_bytes: bytes) -> tuple[int, float]:
    """The minimal loop a user would write; returns (frames, seconds)."""
    import cv2  # noqa: PLC0415

    from agent.runtime import load_model  # noqa: PLC0415

    model = load_model(model_bytes)
    spec = model.inputs[0]
    _, height, width, _ = spec.shape
    pixels = np.arange(256, dtype=np.float64) / 255.0
    lut = np.clip(np.rint(pixels / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    frames = 0
    start = time.perf_counter()
    capture = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG)
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
        scores = model.run([lut[small].reshape(1, height, width, 1)])[0]
        int(np.argmax(scores))
        frames += 1
    capture.release()
    return frames, time.perf_counter() - start


def agent_loop(
    video: Path, model_bytes: bytes, *, top_1: bool = False
) -> tuple[int, float, dict[str, float], str]:
    """The agent's pipeline on the same video; returns (frames, seconds, stage p50s in µs,
    capture mode). The card reports the top 3 with softmax; ``top_1`` reports the best class
    only, without softmax (the hand loop's argmax)."""
    from agent.modelcard import ClassificationPostprocess, card_from_json  # noqa: PLC0415
    from agent.pipeline.loop import FrameLoop, FrameResult  # noqa: PLC0415
    from agent.pipeline.predictor import Predictor  # noqa: PLC0415
    from agent.pipeline.sources import VideoFileSource  # noqa: PLC0415
    from agent.runtime import load_model  # noqa: PLC0415

    card = card_from_json(Path(f"{MODEL}.card.json").read_bytes())
    if top_1 and isinstance(card.postprocess, ClassificationPostprocess):
        post = dataclasses.replace(card.postprocess, top_k=1, softmax=False)
        card = dataclasses.replace(card, postprocess=post)
    predictor = Predictor(load_model(model_bytes), card)
    results = 0

    def sink(result: FrameResult) -> None:
        nonlocal results
        results += 1

    start = time.perf_counter()
    loop = FrameLoop(VideoFileSource(video), predictor, sink, realtime=False)
    stats = loop.run()
    seconds = time.perf_counter() - start
    p50 = {name: h.percentile(50) / 1e3 for name, h in stats.histograms.items()}
    return results, seconds, p50, loop.capture_mode


# ru_maxrss of a child forked from this (large) process would count the pages it shared before
# exec, so a small launcher process forks the measured one and reports wait4's figure.
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_pid, status, usage = os.wait4(process.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def _peak_rss_mib(argv: list[str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, check=True
    )
    maxrss_kib, status = (int(v) for v in done.stdout.split())
    if status != 0:
        raise RuntimeError(f"{argv[:3]}... exited with {status}")
    return maxrss_kib / 1024.0


def memory(video: Path, repeats: int = 3) -> dict[str, float]:
    """Peak RSS (MiB): ``edge-agent run`` on ``video``, the bare import-and-load, and the bare
    process that also decodes and classifies the video by hand."""
    bin_dir = Path(sys.executable).parent
    agent = [str(bin_dir / "edge-agent"), "run", "--model", str(MODEL), "--source", str(video)]
    bare = [sys.executable, "-c", _BARE_SCRIPT, str(MODEL)]
    hand = [*bare, str(video)]
    return {
        name: median([_peak_rss_mib(argv) for _ in range(repeats)])
        for name, argv in (("agent", [*agent, "--json"]), ("bare", bare), ("hand", hand))
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _compare(
    name: str, video: Path, model_bytes: bytes, repeats: int, *, top_1: bool = False
) -> dict[str, Any]:
    """Alternate hand and agent runs; each adjacent pair gives one ratio (so a neighbour's load
    on the shared machine hits both sides of a ratio alike). CPU/wall says how many cores each
    side got: the agent can only overlap decoding with inference when a second one is free."""
    hand_fps: list[float] = []
    agent_fps: list[float] = []
    ratios: list[float] = []
    hand_cores: list[float] = []
    agent_cores: list[float] = []
    p50s: list[dict[str, float]] = []
    modes: set[str] = set()
    frames = 0
    for _ in range(repeats):
        cpu = _cpu_seconds()
        frames, seconds = hand_loop(video, model_bytes)
        hand_cores.append((_cpu_seconds() - cpu) / seconds)
        hand_fps.append(frames / seconds)
        cpu = _cpu_seconds()
        frames, seconds, p50, mode = agent_loop(video, model_bytes, top_1=top_1)
        modes.add(mode)
        agent_cores.append((_cpu_seconds() - cpu) / seconds)
        agent_fps.append(frames / seconds)
        ratios.append(agent_fps[-1] / hand_fps[-1])
        p50s.append(p50)
    return {
        "name": name,
        "frames": frames,
        "hand": median(hand_fps),
        "agent": median(agent_fps),
        "ratio": median(ratios),
        "range": (min(ratios), max(ratios)),
        "cores": (median(hand_cores), median(agent_cores)),
        "p50": {stage: median([p[stage] for p in p50s]) for stage in p50s[0]},
        "capture": "/".join(sorted(modes)),
    }


def _load() -> str:
    """The 1-minute load average: the machine is shared, and other work skews the figures."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main(argv: list[str]) -> int:
    """Generate the videos, run every comparison, print the tables."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench pipeline", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each loop (median)")
    parser.add_argument("--light-frames", type=int, default=3000)
    parser.add_argument("--heavy-frames", type=int, default=300)
    args = parser.parse_args(argv)
    reps = args.repeats
    images, _labels = load_digits()
    model_bytes = MODEL.read_bytes()
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        light = write_digits_video(Path(tmp, "light.avi"), images, count=args.light_frames)
        heavy = write_decode_heavy_video(Path(tmp, "heavy.avi"), images, count=args.heavy_frames)
        results = [
            _compare("light decode (64x64), card: top-3 + softmax", light, model_bytes, reps),
            _compare(
                "light decode (64x64), top-1 (= argmax)", light, model_bytes, reps, top_1=True
            ),
            _compare("decode heavy (1280x720), card", heavy, model_bytes, reps),
        ]
        rss = memory(light)
    rows = []
    for result, target in zip(results, (LIGHT_TARGET, LIGHT_TARGET, HEAVY_TARGET), strict=True):
        verdict = "ok" if result["ratio"] >= target else "MISSED"
        low, high = result["range"]
        rows.append(
            [
                result["name"],
                result["frames"],
                round(result["hand"], 1),
                round(result["agent"], 1),
                f"{result['ratio']:.3f}x",
                f"{low:.2f}-{high:.2f}",
                f"{result['cores'][0]:.2f} / {result['cores'][1]:.2f}",
                result["capture"],
                f">= {target}x {verdict}",
            ]
        )
    print_table(
        f"frames/s, median of {args.repeats} alternating runs (int8 TFLite digits); "
        f"ratio = median of paired agent/hand ratios; load average {load_before} before, "
        f"{_load()} after",
        [
            "source",
            "frames",
            "hand loop fps",
            "agent fps",
            "ratio",
            "ratio range",
            "CPU/wall hand / agent",
            "agent capture",
            "target",
        ],
        rows,
    )
    stage_rows = []
    for result in results:
        p50 = result["p50"]
        stage_rows.append(
            [
                result["name"],
                round(p50["preprocess"], 1),
                round(p50["invoke"], 1),
                round(p50["postprocess"], 1),
                round(p50["overhead"], 1),
                round(p50["wait"], 1),
            ]
        )
    print_table(
        "agent per-frame stages, p50 in microseconds (overhead = worker time per frame "
        "outside preprocess+invoke: postprocess, result delivery, bookkeeping)",
        ["source", "preprocess", "invoke", "postprocess", "overhead", "mailbox wait"],
        stage_rows,
    )
    extra = rss["agent"] - rss["bare"]
    verdict = "ok" if extra <= MEMORY_TARGET_MIB else "MISSED"
    print_table(
        "peak resident memory (ru_maxrss), MiB, median of 3",
        ["process", "MiB", "vs bare", "target"],
        [
            ["bare python -c: numpy+cv2+litert, model loaded", round(rss["bare"], 1), "", ""],
            [
                "edge-agent run --json (light video)",
                round(rss["agent"], 1),
                f"+{extra:.1f}",
                f"<= +{MEMORY_TARGET_MIB:.0f} {verdict}",
            ],
            [
                "bare + decode and classify the video by hand",
                round(rss["hand"], 1),
                f"+{rss['hand'] - rss['bare']:.1f}",
                "(for reference)",
            ],
        ],
    )
    return 0
