"""The updater service when things go wrong: a cut download, activation and watch errors.

Real controller home, real repository server on the in-memory broker, real MQTT repository
fetcher with its partial files, real runtimes and frame loop. Faults are injected where they
happen in production: the link drops the first download of a target midway (the server stops
answering that download's requests), the inference service's ``activate`` or ``health`` raises.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.config import SourceConfig, UpdateConfig
from agent.daemon.inference import InferenceService, LoopHealth, RunningModel
from agent.daemon.outbox import Outbox
from agent.daemon.repofetch import MqttRepositoryFetcher
from agent.daemon.update_machine import State
from agent.daemon.updater import EventPublisher, UpdaterService
from agent.modelcard import card_from_json, card_to_json
from agent.pipeline.loop import FrameResult
from agent.protocol.messages import EventMessage, RepoRequest, decode
from agent.protocol.topics import Topics
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.reports import verify_report
from agent.supplychain.store import DeviceState
from agent.transport import MemoryBroker, MemoryTransport, MessageProperties
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.packing import pack_model
from tools.fleetctl.reposerver import RepositoryServer
from tools.videos import MODELS_DIR, load_digits, write_digits_video

pytestmark = pytest.mark.inference

DEVICE = "cam-01"
TOPICS = Topics()
TIMEOUT = 30.0
CUT_AT = 4096  # the first download of a target stops after this many bytes


class CutLinkServer(RepositoryServer):
    """The repository server behind a link that drops the first target download midway.

    Every download uses its own 8-byte request-id prefix: requests of the first download of a
    target file at or after ``CUT_AT`` get no answer, later downloads are served in full.
    The link is whole until ``cutting`` is set.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cutting = False
        self.cut_downloads: dict[str, bytes] = {}
        self.dropped = 0

    def handle(self, topic: str, payload: bytes, props: MessageProperties) -> None:
        request = decode(RepoRequest, payload)
        cut = self.cutting and request.offset >= CUT_AT
        if cut and request.path.startswith("image/targets/"):
            prefix = request.request_id_bytes[:8]
            if self.cut_downloads.setdefault(request.path, prefix) == prefix:
                self.dropped += 1
                return
        super().handle(topic, payload, props)


class FaultyInference(InferenceService):
    """The real inference service; ``health`` or the activation of one model can be made to fail.

    ``activate_fails[label]`` is "before" (nothing changes, as when a source does not open) or
    "after" (the swap happens, then a timeout is raised, as when the old frame does not finish).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.health_fails = False
        self.activate_fails: dict[str, str] = {}

    def health(self) -> LoopHealth:
        if self.health_fails:
            raise RuntimeError("loop statistics unavailable")
        return super().health()

    def activate(self, model: RunningModel) -> RunningModel | None:
        when = self.activate_fails.pop(model.label, None)
        if when == "before":
            raise RuntimeError(f"source would not open for {model.label}")
        previous = super().activate(model)
        if when == "after":
            raise TimeoutError("swap: old predictor still busy after 5.0s")
        return previous


@dataclasses.dataclass
class Device:
    home: FleetHome
    bundle: Path
    updater: UpdaterService
    inference: FaultyInference
    outbox: Outbox
    identity: DeviceIdentity
    fetcher: MqttRepositoryFetcher
    server: CutLinkServer
    results: list[str]
    results_seen: threading.Condition

    def events(self) -> list[EventMessage]:
        return [
            decode(EventMessage, m.payload)
            for m in self.outbox.peek(10_000)
            if m.topic.endswith("/events")
        ]

    def failed_targets(self) -> dict[str, Any]:
        path = self.bundle / "failed-targets.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_cycles(self, predicate: Callable[[], bool], what: str) -> None:
        with self.updater.cycle_done:
            assert self.updater.cycle_done.wait_for(predicate, TIMEOUT), f"timed out: {what}"

    def wait_results(self, label: str, count: int) -> None:
        """Wait for ``count`` more results from the model ``label``."""
        with self.results_seen:
            start = len(self.results)

            def enough() -> bool:
                return self.results[start:].count(label) >= count

            assert self.results_seen.wait_for(enough, TIMEOUT), f"no results from {label}"

    def assign(self, version: str) -> None:
        assign_model(self.home, DEVICE, "digits", version)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={"root": (1, 1), "targets": (1, 1)})
    bundle = tmp_path / "bundle"
    enrol_device(home, DEVICE, out_dir=bundle)
    identity = DeviceIdentity.load(bundle / "identity")
    state = DeviceState(bundle)
    broker = MemoryBroker()
    controller = MemoryTransport(broker=broker, client_id="fleetctl")
    server = CutLinkServer(home, controller, TOPICS)
    server.start()
    controller.connect()
    link = MemoryTransport(broker=broker, client_id=DEVICE)
    link.connect()
    fetcher = MqttRepositoryFetcher(
        link,
        TOPICS,
        DEVICE,
        window=2,
        segment_bytes=1024,
        timeout_s=0.5,
        request_timeout_s=0.1,
        partial_dir=bundle / "partial",
    )
    images, _labels = load_digits()
    video = write_digits_video(tmp_path / "digits.avi", images[:40], fps=20)
    results: list[str] = []
    results_seen = threading.Condition()

    def on_result(_result: FrameResult, running: RunningModel) -> None:
        with results_seen:
            results.append(running.label)
            results_seen.notify_all()

    inference = FaultyInference(SourceConfig(spec=str(video), loop=True), on_result=on_result)
    outbox = Outbox(bundle / "outbox.sqlite", max_bytes=10**7, max_messages=10_000)
    events = EventPublisher(
        outbox=outbox, topics=TOPICS, device_id=DEVICE, boot_id="b" * 32, identity=identity
    )
    updater = UpdaterService(
        config=UpdateConfig(watch_s=0.3, poll_interval_s=3600.0),
        state=state,
        identity=identity,
        device_id=DEVICE,
        fetcher_factory=lambda: fetcher,
        inference=inference,
        events=events,
        retry_after_s=0.05,
    )
    yield Device(
        home, bundle, updater, inference, outbox, identity, fetcher, server, results, results_seen
    )
    updater.stop()
    inference.stop()
    outbox.close()
    server.stop()


def test_cut_download_is_retried_soon_and_resumed_not_failed(device: Device) -> None:
    pack_model(device.home, MODELS_DIR / "digits_int8.tflite", name="digits", version="1.0.0")
    device.assign("1.0.0")
    device.server.cutting = True
    device.updater.start()  # polls hourly: only the backoff after the cut brings the retry
    device.wait_cycles(lambda: device.updater.machine.state is State.COMMITTED, "v1 committed")

    assert device.server.dropped > 0  # the first download was cut
    assert device.fetcher.stats().bytes_resumed >= CUT_AT  # and the retry resumed its partial
    kinds = [e.kind for e in device.events()]
    cut, retried = ["refreshing", "fetching"], ["refreshing", "fetching", "verified"]
    assert kinds == [*cut, *retried, "activated", "committed"]
    assert not (device.bundle / "failed-targets.json").exists()
    assert device.updater.transport_failures == 0
    assert device.updater.next_wait_s() == 3600.0
    installed = json.loads((device.bundle / "installed.json").read_text())
    assert installed["current"]["version"] == "1.0.0"

    # a self-test failure is the target's fault: reported, signed and remembered
    card = card_from_json((MODELS_DIR / "digits_int8.onnx.card.json").read_text())
    wrong = dataclasses.replace(card.selftest[0], expected=(), expected_argmax=6)
    bad_card = device.bundle.parent / "bad.card.json"
    bad_card.write_text(card_to_json(dataclasses.replace(card, selftest=(wrong,))))
    bad = pack_model(
        device.home,
        MODELS_DIR / "digits_int8.onnx",
        name="digits",
        version="2.0.0",
        card_path=bad_card,
        warn=lambda _message: None,
        allow_failing_selftest=True,
    )
    device.assign("2.0.0")
    device.updater.notify()
    device.wait_cycles(lambda: device.updater.machine.state is State.FAILED, "v2 failed")
    failed = device.events()[-1]
    assert failed.kind == "failed" and failed.version == "2.0.0"
    assert failed.reason is not None and failed.reason.startswith("self-test failed")
    report = verify_report(failed.report, device.identity.ed25519.public_key())
    assert report["reason"] == failed.reason
    assert report["previous_version"] == failed.previous_version == "1.0.0"
    remembered = device.failed_targets()
    assert [entry["version"] for entry in remembered.values()] == ["2.0.0"]
    assert bad.record.target_path in next(iter(remembered.values()))["target"]


def _last_event(device: Device) -> EventMessage:
    return device.events()[-1]


def test_activation_and_watch_errors_end_the_cycle_and_the_next_one_works(
    device: Device,
) -> None:
    pack_model(device.home, MODELS_DIR / "digits_int8.tflite", name="digits", version="1.0.0")
    for version in ("2.0.0", "3.0.0", "4.0.0", "5.0.0"):
        pack_model(device.home, MODELS_DIR / "digits_int8.onnx", name="digits", version=version)
    updater, inference = device.updater, device.inference

    def cycle(version: str) -> State:
        device.assign(version)
        updater.run_cycle()
        assert not updater.machine.busy
        return updater.machine.state

    def running() -> str | None:
        model = inference.running
        return model.version if model is not None else None

    assert cycle("1.0.0") is State.COMMITTED and running() == "1.0.0"

    # the watch raises: counted as failed, rolled back to v1
    inference.health_fails = True
    assert cycle("2.0.0") is State.ROLLED_BACK
    inference.health_fails = False
    rolled = _last_event(device)
    assert rolled.kind == "rolled-back" and rolled.version == "2.0.0"
    assert rolled.reason is not None and rolled.reason.startswith("watch failed: RuntimeError")
    report = verify_report(rolled.report, device.identity.ed25519.public_key())
    assert (report["reason"], report["previous_version"]) == (rolled.reason, "1.0.0")
    assert running() == "1.0.0"
    assert [entry["version"] for entry in device.failed_targets().values()] == ["2.0.0"]

    # the swap to v3 happens but times out: v1 is swapped back in, v3 is rejected
    inference.activate_fails["digits@3.0.0"] = "after"
    assert cycle("3.0.0") is State.FAILED
    failed = _last_event(device)
    assert failed.kind == "failed" and failed.version == "3.0.0"
    assert failed.reason is not None and failed.reason.startswith("activation failed: Timeout")
    assert running() == "1.0.0"
    device.wait_results("digits@1.0.0", 3)  # frames still flow, from v1
    assert [entry["version"] for entry in device.failed_targets().values()] == ["3.0.0"]

    # v4 fails its watch and v1 cannot be restored: inference stops rather than run v4
    inference.health_fails = True
    inference.activate_fails["digits@1.0.0"] = "before"
    assert cycle("4.0.0") is State.ROLLED_BACK
    inference.health_fails = False
    rolled = _last_event(device)
    assert rolled.reason is not None and "restoring digits@1.0.0 failed" in rolled.reason
    assert running() is None and inference.loop is None
    assert [entry["version"] for entry in device.failed_targets().values()] == ["4.0.0"]

    # the machine is free: the next target goes through and runs
    assert cycle("5.0.0") is State.COMMITTED and running() == "5.0.0"
    assert _last_event(device).kind == "committed"
    device.wait_results("digits@5.0.0", 3)
