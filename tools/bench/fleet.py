"""Fleet benchmark: hot model swaps during a running video; an idle daemon's memory.

* Hot swap: a :class:`FrameLoop` plays a generated digits video paced like a camera
  (real-time mode) with a real int8 TFLite :class:`Predictor`; every ``--swap-every`` seconds
  it is swapped for a real int8 ONNX predictor and back (both loaded beforehand, as the
  daemon's updater does before it activates). Reported: frames in the video vs results,
  dropped frames, and the longest gap between two consecutive results next to the normal
  (median) interval. Targets: zero dropped frames, longest gap <= 2x the normal interval.
* Idle memory: one ``edge-agent daemon`` in a simulated fleet (embedded broker), given the
  digits model by a real rollout, then left running its video at 2 fps; its resident memory
  (``VmRSS``) and peak (``VmHWM``) from ``/proc``, with the TFLite v1 and then the ONNX v2 model.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench.table import print_table
from tools.videos import MODELS_DIR, load_digits, write_digits_video

GAP_TARGET = 2.0


def _predictor(model_file: str) -> Any:
    from agent.modelcard import card_from_json  # noqa: PLC0415
    from agent.pipeline.predictor import Predictor  # noqa: PLC0415
    from agent.runtime import load_model  # noqa: PLC0415

    path = MODELS_DIR / model_file
    card = card_from_json(Path(f"{path}.card.json").read_bytes())
    return Predictor(load_model(path.read_bytes()), card)


def hot_swap(workdir: Path, *, fps: float, seconds: float, swap_every: float) -> list[object]:
    """Play a video in real time, swapping models; returns one table row."""
    from agent.pipeline.loop import FrameLoop, FrameResult  # noqa: PLC0415
    from agent.pipeline.sources import VideoFileSource  # noqa: PLC0415

    images, _labels = load_digits()
    frames = int(fps * seconds)
    video = write_digits_video(workdir / "swap.avi", images, count=frames, fps=fps)
    tflite, onnx = _predictor("digits_int8.tflite"), _predictor("digits_int8.onnx")
    arrivals: list[float] = []
    indices: list[int] = []

    def sink(result: FrameResult) -> None:
        arrivals.append(time.perf_counter())
        indices.append(result.frame)

    loop = FrameLoop(VideoFileSource(video), tflite, sink, realtime=True)
    loop.start()
    pause = threading.Event()
    while not loop.wait(0):
        pause.wait(swap_every)
        if loop.wait(0):
            break
        loop.swap(onnx if loop.predictor is tflite else tflite)
    loop.stop()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    normal = statistics.median(gaps)
    longest = max(gaps)
    ratio = longest / normal
    ok = loop.stats.dropped == 0 and sorted(set(indices)) == list(range(frames))
    verdict = "ok" if ok and ratio <= GAP_TARGET else "MISSED"
    return [
        frames,
        len(indices),
        loop.stats.dropped,
        loop.stats.swaps,
        f"{1000 * normal:.1f}",
        f"{1000 * longest:.1f}",
        f"{ratio:.2f}x",
        verdict,
    ]


def _memory_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def idle_memory(workdir: Path, *, settle_s: float) -> list[list[object]]:
    """RSS of one daemon with v1 (TFLite), then v2 (ONNX) loaded; one row per model."""
    from tools.fleetsim import Fleet, FleetSpec  # noqa: PLC0415

    rows: list[list[object]] = []
    spec = FleetSpec(devices=1, fps=2.0, watch_s=1.0, metrics=False)
    with Fleet(spec, workdir) as fleet:
        fleet.start()
        device_id = spec.device_ids()[0]
        pid = fleet.agents[device_id].process.pid
        rows.append(["no model yet", *(f"{k / 1024:.1f}" for k in _memory_kib(pid))])
        for model, runtime in (("digits@1", "TFLite"), ("digits@2", "ONNX")):
            rollout = fleet.wait_rollout(fleet.deploy(model, "--all"))
            if rollout["state"] != "succeeded":
                raise RuntimeError(f"rollout of {model}: {rollout['state']}, expected succeeded")
            fleet.wait_models({device_id: model})
            threading.Event().wait(settle_s)  # the daemon idles on its 2 fps video meanwhile
            rss, peak = _memory_kib(pid)
            rows.append([f"{model} ({runtime})", f"{rss / 1024:.1f}", f"{peak / 1024:.1f}"])
    return rows


def main(argv: list[str]) -> int:
    """Run both measurements and print their tables."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench fleet", description=__doc__)
    parser.add_argument("--fps", type=float, default=30.0, help="video frame rate (default 30)")
    parser.add_argument("--seconds", type=float, default=8.0, help="video length (default 8)")
    parser.add_argument("--swap-every", type=float, default=0.25, help="seconds between swaps")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds before RSS")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        row = hot_swap(Path(tmp), fps=args.fps, seconds=args.seconds, swap_every=args.swap_every)
        print_table(
            f"hot swap TFLite <-> ONNX every {args.swap_every:g} s, {args.fps:g} fps real time"
            f" (targets: 0 dropped, longest gap <= {GAP_TARGET:g}x normal)",
            ["frames", "results", "dropped", "swaps", "normal ms", "longest ms", "ratio", ""],
            [row],
        )
        memory = idle_memory(Path(tmp) / "fleet", settle_s=args.settle)
        print_table(
            "edge-agent daemon memory, idle on a 2 fps video (MiB)",
            ["model loaded", "VmRSS", "VmHWM"],
            memory,
        )
    return 0 if row[-1] == "ok" else 1
