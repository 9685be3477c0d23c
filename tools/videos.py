"""Test and demo inputs made on the fly: digit videos, a decode-heavy video, a face video.

Videos are MJPG in .avi (what OpenCV's bundled FFmpeg writes everywhere; H.264 encoders are
not shipped). They are generated into temporary directories by tests, the pipeline benchmark and
the demo, never committed. Frame ``i`` of a digits video shows ``images[i % len(images)]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.atomicio import atomic_write

__all__ = [
    "MODELS_DIR",
    "load_digits",
    "write_decode_heavy_video",
    "write_digits_folder",
    "write_digits_video",
    "write_face_video",
    "write_video",
]

MODELS_DIR = Path(__file__).resolve().parent / "models"

Frame = npt.NDArray[np.uint8]


def _cv2() -> Any:
    import cv2  # noqa: PLC0415 - optional dependency (the camera extra)

    return cv2


def load_digits(
    path: str | os.PathLike[str] = MODELS_DIR / "digits_test.npz",
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The held-out digits: ``images`` uint8 (N, 8, 8) 0..255 and ``labels`` (N,)."""
    with np.load(path) as data:
        return np.asarray(data["images"], np.uint8), np.asarray(data["labels"], np.int64)


def write_video(
    path: str | os.PathLike[str], frames: Iterable[Frame], *, fps: float = 30.0
) -> Path:
    """Write BGR uint8 frames (all the same size) as an MJPG .avi; returns the path."""
    cv2 = _cv2()
    target = Path(path)
    writer: Any = None
    count = 0
    try:
        for frame in frames:
            if writer is None:
                height, width = frame.shape[:2]
                fourcc = cv2.VideoWriter_fourcc(*"MJPG")
                writer = cv2.VideoWriter(str(target), fourcc, fps, (width, height))
                if not writer.isOpened():
                    raise OSError(f"cannot write MJPG video to {target}")
            writer.write(np.ascontiguousarray(frame))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    if count == 0:
        raise ValueError("write_video: expected at least one frame, got none")
    return target


def digit_frames(
    images: npt.NDArray[np.uint8], *, scale: int = 8, count: int | None = None
) -> Iterator[Frame]:
    """Each 8x8 digit enlarged ``scale`` times (nearest), as a BGR frame; cycles to ``count``."""
    cv2 = _cv2()
    total = len(images) if count is None else count
    for index in range(total):
        gray = np.kron(images[index % len(images)], np.ones((scale, scale), np.uint8))
        yield cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def write_digits_video(
    path: str | os.PathLike[str],
    images: npt.NDArray[np.uint8],
    *,
    scale: int = 8,
    fps: float = 30.0,
    count: int | None = None,
) -> Path:
    """A light-decode video: one small frame (8*scale pixels square) per digit."""
    return write_video(path, digit_frames(images, scale=scale, count=count), fps=fps)


def write_decode_heavy_video(
    path: str | os.PathLike[str],
    images: npt.NDArray[np.uint8],
    *,
    size: tuple[int, int] = (1280, 720),
    fps: float = 30.0,
    count: int | None = None,
    noise: int = 12,
    seed: int = 0,
) -> Path:
    """Large frames (decoding costs far more than inferring): the digit stretched over a
    ``size`` frame with sensor-like noise, so JPEG cannot compress it away."""
    cv2 = _cv2()
    rng = np.random.default_rng(seed)
    width, height = size
    grain = rng.integers(-noise, noise + 1, size=(4, height, width), dtype=np.int16)
    total = len(images) if count is None else count

    def frames() -> Iterator[Frame]:
        for index in range(total):
            digit = cv2.resize(
                images[index % len(images)], (width, height), interpolation=cv2.INTER_NEAREST
            )
            noisy = np.clip(digit.astype(np.int16) + grain[index % 4], 0, 255).astype(np.uint8)
            yield cv2.cvtColor(noisy, cv2.COLOR_GRAY2BGR)

    return write_video(path, frames(), fps=fps)


def write_face_video(
    path: str | os.PathLike[str],
    image: str | os.PathLike[str] = MODELS_DIR / "astronaut.jpg",
    *,
    count: int = 30,
    fps: float = 30.0,
    shift: int = 2,
) -> Path:
    """A video panning slowly across a still photo (``astronaut.jpg`` by default)."""
    cv2 = _cv2()
    picture = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if picture is None:
        raise OSError(f"cannot read image {image}")
    _height, width = picture.shape[:2]
    margin = shift * count

    def frames() -> Iterator[Frame]:
        for index in range(count):
            x = index * shift
            yield picture[:, x : x + width - margin]

    return write_video(path, frames(), fps=fps)


def write_digits_folder(
    folder: str | os.PathLike[str], images: npt.NDArray[np.uint8], *, scale: int = 8
) -> list[Path]:
    """One PNG per digit (``0000.png``, ``0001.png``, ...) in ``folder``; returns the paths."""
    cv2 = _cv2()
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(digit_frames(images, scale=scale)):
        ok, encoded = cv2.imencode(".png", frame)
        if not ok:
            raise OSError("cannot encode PNG")
        path = target / f"{index:04d}.png"
        atomic_write(path, encoded.tobytes())
        paths.append(path)
    return paths
