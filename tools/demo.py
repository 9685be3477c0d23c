"""``make demo``: run the int8 TFLite digits model on a video of held-out digits.

Generates an MJPG video of digits the model never saw in training, then runs ``edge-agent run``
on it twice: once paced like a camera (``--realtime``) with the live result line and summary,
and once as fast as it goes with ``--json``, to score the results against the true labels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools.videos import MODELS_DIR, load_digits, write_digits_video

MODEL = MODELS_DIR / "digits_int8.tflite"


def _edge_agent() -> str:
    script = Path(sys.executable).parent / "edge-agent"
    return str(script) if script.exists() else "edge-agent"


def main(argv: list[str] | None = None) -> int:
    """Make the video, show the live run, then score a JSON run."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    parser.add_argument("--frames", type=int, default=90, help="digits in the video")
    parser.add_argument("--fps", type=float, default=15.0, help="frame rate of the video")
    args = parser.parse_args(argv)
    images, labels = load_digits()
    count = min(args.frames, len(images))
    with tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        video = write_digits_video(Path(tmp, "digits.avi"), images[:count], fps=args.fps)
        command = [_edge_agent(), "run", "--model", str(MODEL), "--source", str(video)]
        print(f"== {count} held-out digits at {args.fps:g} fps: {' '.join(command[1:])} --realtime")
        sys.stdout.flush()
        live = subprocess.run([*command, "--realtime"], check=False)
        if live.returncode != 0:
            return live.returncode
        print("\n== the same video as fast as it decodes, --json, scored against the labels")
        sys.stdout.flush()
        scored = subprocess.run(
            [*command, "--json"], capture_output=True, text=True, check=False, timeout=300
        )
        if scored.returncode != 0:
            sys.stderr.write(scored.stderr)
            return scored.returncode
    results = [json.loads(line) for line in scored.stdout.splitlines()]
    predicted = np.array([int(r["top"][0]["label"]) for r in results])
    truth = labels[[r["frame"] for r in results]]
    summary = json.loads(scored.stderr.strip().splitlines()[-1])["summary"]
    invoke = summary["latency"]["invoke"]
    print(
        f"accuracy {float((predicted == truth).mean()):.3f} on {len(results)} frames; "
        f"{summary['fps']:.0f} fps; invoke p50 {invoke['p50_ms']:.3f} ms, "
        f"p99 {invoke['p99_ms']:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
