"""``python -m tools.bench delivery``: model delivery over MQTT against a raw paho transfer.

In one run, on one broker (mosquitto if installed, else the embedded broker):

* **delivery**: a 20 MiB ONNX model (a graph with a 20 MiB constant initializer, built with
  ``onnx.helper``) packed with ``tools.fleetctl`` and assigned to a device; the device side is
  timed end to end from a fresh copy of its provisioning bundle: refresh (director + image,
  ngclient), fetch over :class:`~agent.daemon.repofetch.MqttRepositoryFetcher` (served by
  :class:`~tools.fleetctl.reposerver.RepositoryServer`), verify, unseal, decrypt, load, self-test
  and activate (record the install);
* **raw**: the same ciphertext bytes as segment-sized QoS 1 messages from a bare paho publisher with
  the same window (``max_inflight``) to a bare paho subscriber: what the broker and the client
  library can do with no protocol on top. (The benchmark talks to paho directly on purpose; the
  product only does through ``agent.transport.mqtt``.)

The table gives MiB/s of ciphertext for both, the ratio (target >= 0.5) and segments lost or
requested again (target 0). Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.bench.table import median, print_table

__all__ = ["main"]

_MIB = 1024 * 1024
_CONNECT_TIMEOUT = 10.0
_DEVICE = "bench-01"


def build_onnx_model(path: Path, size_bytes: int) -> None:
    """Write a valid ONNX model whose constant initializer holds ``size_bytes`` of float32."""
    import numpy as np  # noqa: PLC0415 - the controller extra, only for this benchmark
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    weights = np.random.default_rng(7).standard_normal(size_bytes // 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["W"], ["S"], keepdims=0),
            helper.make_node("Add", ["X", "S"], ["Y"]),
        ],
        "delivery_bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(weights, name="W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


@contextlib.contextmanager
def running_broker(workdir: Path) -> Iterator[tuple[str, int, str]]:
    """``(host, port, name)`` of a broker for the run: mosquitto, else the embedded broker."""
    from tests.mosquitto import Mosquitto, MosquittoError, free_port  # noqa: PLC0415

    try:
        with Mosquitto(workdir / "mosquitto", extra_config=["set_tcp_nodelay true"]) as mosquitto:
            yield mosquitto.host, mosquitto.port, "mosquitto"
            return
    except MosquittoError as exc:
        logging.getLogger(__name__).warning("no mosquitto (%s); using the embedded broker", exc)
    from tools.fleetctl.broker import EmbeddedBroker  # type: ignore[import-not-found]  # noqa: PLC0415

    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        yield "127.0.0.1", port, "embedded"
    finally:
        broker.stop()


def _transport(host: str, port: int, client_id: str) -> Any:
    from agent.transport.mqtt import PahoTransport  # noqa: PLC0415

    transport = PahoTransport(host=host, port=port, client_id=client_id)
    return transport


def delivery_once(
    bundle: Path, scratch: Path, *, host: str, port: int, window: int, segment: int
) -> tuple[float, dict[str, float], int, int]:
    """One device-side delivery: ``(seconds, phase seconds, ciphertext bytes, retries)``."""
    from agent.daemon.repofetch import MqttRepositoryFetcher  # noqa: PLC0415
    from agent.pipeline.selftest import run_self_test  # noqa: PLC0415
    from agent.protocol.topics import Topics  # noqa: PLC0415
    from agent.runtime import load_model  # noqa: PLC0415
    from agent.supplychain.store import DeviceState  # noqa: PLC0415
    from agent.supplychain.verify import DeviceUpdateClient  # noqa: PLC0415

    state_dir = scratch / "state"
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.copytree(bundle, state_dir)
    topics = Topics()
    transport = _transport(host, port, _DEVICE)
    fetcher = MqttRepositoryFetcher(
        transport,
        topics,
        _DEVICE,
        window=window,
        segment_bytes=segment,
        partial_dir=scratch / "partial",
    )
    transport.connect()
    try:
        if not transport.wait_subscribed(_CONNECT_TIMEOUT):
            raise SystemExit("delivery bench: the device could not connect to the broker")
        state = DeviceState(state_dir)
        phases: dict[str, float] = {}
        start = time.perf_counter()
        client = DeviceUpdateClient(state, fetcher, device_id=_DEVICE)
        plan = client.refresh()
        phases["refresh"] = time.perf_counter() - start
        mark = time.perf_counter()
        verified = client.fetch_and_decrypt(plan)
        phases["fetch+verify+decrypt"] = time.perf_counter() - mark
        mark = time.perf_counter()
        model = load_model(bytes(verified.plaintext))
        if not run_self_test(model, plan.card).passed:
            raise SystemExit("delivery bench: the model failed its self-test")
        state.record_install(verified.installed_target())
        phases["load+self-test+activate"] = time.perf_counter() - mark
        elapsed = time.perf_counter() - start
        return elapsed, phases, plan.length, fetcher.stats().retries
    finally:
        transport.disconnect()


def fetch_only_once(
    url: str, scratch: Path | None, *, host: str, port: int, window: int, segment: int
) -> tuple[float, int]:
    """The MQTT transfer alone (no verification): ``(seconds, retries)``.

    With ``scratch`` the fetcher keeps its resumable partial file there (as the daemon does);
    with None it writes nothing of its own (ngclient's temporary file is still written).
    """
    from agent.daemon.repofetch import MqttRepositoryFetcher  # noqa: PLC0415
    from agent.protocol.topics import Topics  # noqa: PLC0415

    transport = _transport(host, port, _DEVICE)
    fetcher = MqttRepositoryFetcher(
        transport, Topics(), _DEVICE, window=window, segment_bytes=segment, partial_dir=scratch
    )
    transport.connect()
    try:
        if not transport.wait_subscribed(_CONNECT_TIMEOUT):
            raise SystemExit("delivery bench: the device could not connect to the broker")
        start = time.perf_counter()
        fetcher.download_bytes(url, 2**40)
        return time.perf_counter() - start, fetcher.stats().retries
    finally:
        transport.disconnect()


def raw_paho_once(
    host: str, port: int, data: bytes, *, window: int, segment: int
) -> tuple[float, int]:
    """Publish ``data`` in ``segment`` chunks, QoS 1, ``window`` in flight: ``(seconds, lost)``."""
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    topic = "bench/raw/data"
    chunks = [data[i : i + segment] for i in range(0, len(data), segment)]
    received = [0]
    done = threading.Event()
    subscribed = threading.Event()
    connected = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        received[0] += 1
        if received[0] == len(chunks):
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-sub", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-pub", protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(window)
    pub.max_queued_messages_set(0)
    pub.on_connect = lambda *_a: connected.set()
    for client in (sub, pub):
        client.connect(host, port)
        client.loop_start()
    try:
        if not (subscribed.wait(_CONNECT_TIMEOUT) and connected.wait(_CONNECT_TIMEOUT)):
            raise SystemExit("delivery bench: raw paho clients could not connect")
        start = time.perf_counter()
        for chunk in chunks:
            pub.publish(topic, chunk, qos=1)
        done.wait(60.0)
        elapsed = time.perf_counter() - start
        return elapsed, len(chunks) - received[0]
    finally:
        for client in (sub, pub):
            client.disconnect()
            client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    """Run the delivery benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench delivery", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=20, help="model size (default 20 MiB)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--window", type=int, default=8, help="requests in flight")
    parser.add_argument(
        "--segment-kib",
        type=int,
        default=512,
        help="segment size in KiB (default 512, as edge-agent daemon requests)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    segment = args.segment_kib * 1024

    from agent.protocol.topics import Topics  # noqa: PLC0415
    from tools.fleetctl.devices import assign_model, enrol_device  # noqa: PLC0415
    from tools.fleetctl.home import FleetHome  # noqa: PLC0415
    from tools.fleetctl.packing import pack_model  # noqa: PLC0415
    from tools.fleetctl.reposerver import RepositoryServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp_name:
        tmp = Path(tmp_name)
        model_path = tmp / "big.onnx"
        build_onnx_model(model_path, args.size_mib * _MIB)
        home = FleetHome(tmp / "home")
        home.create(image_thresholds={})
        record = pack_model(home, model_path, name="big", version="1", warn=lambda _m: None)
        bundle = tmp / "bundle"
        enrol_device(home, _DEVICE, out_dir=bundle)
        assign_model(home, _DEVICE, "big", "1")
        ciphertext = home.image().target_file(home.image().get_target(record.record.target_path))  # type: ignore[arg-type]
        data = ciphertext.read_bytes()
        url = f"repo://{ciphertext.relative_to(home.repo_dir)}"

        with running_broker(tmp) as (host, port, broker_name):
            ctl = _transport(host, port, "bench-ctl")
            server = RepositoryServer(home, ctl, Topics(), shared=broker_name == "mosquitto")
            server.start()
            ctl.connect()
            if not ctl.wait_subscribed(_CONNECT_TIMEOUT):
                raise SystemExit("delivery bench: the controller could not connect")
            deliveries, raws, fetches, bare_fetches = [], [], [], []
            phases: dict[str, list[float]] = {}
            retries = lost = 0
            length = 0
            try:
                for _ in range(args.runs):
                    seconds, phase, length, retried = delivery_once(
                        bundle,
                        tmp / "device",
                        host=host,
                        port=port,
                        window=args.window,
                        segment=segment,
                    )
                    deliveries.append(seconds)
                    retries += retried
                    for name, value in phase.items():
                        phases.setdefault(name, []).append(value)
                    raw_seconds, raw_lost = raw_paho_once(
                        host, port, data, window=args.window, segment=segment
                    )
                    raws.append(raw_seconds)
                    fetch_seconds, fetch_retried = fetch_only_once(
                        url,
                        tmp / "fetch-partial",
                        host=host,
                        port=port,
                        window=args.window,
                        segment=segment,
                    )
                    fetches.append(fetch_seconds)
                    retries += fetch_retried
                    bare_seconds, bare_retried = fetch_only_once(
                        url, None, host=host, port=port, window=args.window, segment=segment
                    )
                    bare_fetches.append(bare_seconds)
                    retries += bare_retried
                    lost += raw_lost
            finally:
                server.stop()
                ctl.disconnect()

    mib = length / _MIB
    t_delivery, t_raw, t_fetch = median(deliveries), median(raws), median(fetches)
    t_bare = median(bare_fetches)
    fetch = median(phases["fetch+verify+decrypt"])
    print_table(
        f"Model delivery over MQTT ({mib:.1f} MiB ciphertext, {broker_name}, window"
        f" {args.window}, {args.segment_kib} KiB segments, median of {args.runs})",
        ["transfer", "MiB/s", "s", "ratio vs raw", "lost / retried"],
        [
            ["raw paho QoS 1 publish -> subscribe", mib / t_raw, t_raw, 1.0, lost],
            ["MQTT fetch alone, no partial file", mib / t_bare, t_bare, t_raw / t_bare, retries],
            [
                "MQTT fetch alone (MqttRepositoryFetcher)",
                mib / t_fetch,
                t_fetch,
                t_raw / t_fetch,
                retries,
            ],
            ["fetch + verify + decrypt", mib / fetch, fetch, t_raw / fetch, retries],
            [
                "delivery end to end (target >= 0.5)",
                mib / t_delivery,
                t_delivery,
                t_raw / t_delivery,
                retries,
            ],
        ],
    )
    print_table(
        "Delivery phases (median seconds)",
        ["phase", "s"],
        [[name, median(values)] for name, values in phases.items()],
    )
    return 0
