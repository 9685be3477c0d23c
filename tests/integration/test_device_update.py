"""Device updates end to end on the controller's real repository code, in temporary directories.

:class:`SupplyChainWorld` (also used by ``test_attacks.py``) is a controller with an image
repository and a director, built with ``tools.fleetctl.repository``, plus provisioned device
state directories; the device side runs the real ``tuf.ngclient`` verification through
:class:`LocalDirectoryFetcher`. Every attack is a few lines on top of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuf.ngclient.fetcher import FetcherInterface

from agent.cli import main as edge_agent
from agent.modelcard import ModelCard, card_from_json
from agent.supplychain.envelope import encrypt_bytes, new_content_key
from agent.supplychain.errors import NamespaceMismatchError
from agent.supplychain.fetcher import LocalDirectoryFetcher
from agent.supplychain.grants import Grant, seal_content_key
from agent.supplychain.identity import DeviceIdentity
from agent.supplychain.store import DeviceState, InstallRecord
from agent.supplychain.targets import (
    DirectorTargetCustom,
    EncryptionInfo,
    ImageTargetCustom,
    target_path,
)
from agent.supplychain.verify import DeviceUpdateClient, UpdateLimits, VerifiedModel
from tools.fleetctl.devices import assign_model, enrol_device
from tools.fleetctl.home import FleetHome
from tools.fleetctl.keys import KeyStore
from tools.fleetctl.packing import pack_model
from tools.fleetctl.repository import DirectorRepository, ImageRepository, TargetEntry

MODELS = Path(__file__).resolve().parents[2] / "tools" / "models"
SEGMENT = 1024


@dataclass(frozen=True)
class Published:
    """A model version in the image repository, with what the controller keeps about it."""

    path: str
    plaintext: bytes
    ciphertext: bytes
    content_key: bytes
    length: int
    hashes: dict[str, str]
    card: ModelCard

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]


class SupplyChainWorld:
    """A controller (image repository + director) and provisioned devices, all on disk."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        image_thresholds: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.repo_dir = self.home / "repo"
        self.keys = KeyStore(self.home / "keys")
        self.image = ImageRepository.create(
            self.repo_dir / "image", self.keys, thresholds=image_thresholds
        )
        self.director = DirectorRepository.create(
            self.repo_dir / "director", self.home / "director-root", self.keys
        )
        self.identities: dict[str, DeviceIdentity] = {}

    # -- controller side ------------------------------------------------------------------------

    def add_device(self, device_id: str) -> DeviceState:
        """Enrol a device and write its provisioned state directory (identity + trust roots)."""
        identity = DeviceIdentity.generate()
        state = DeviceState(self.tmp / "devices" / device_id)
        identity.save(state.identity_dir)
        (state.root / "agent.toml").write_text(f'[device]\nid = "{device_id}"\n')
        for name, source in (
            ("image", self.image.metadata_path("root", 1)),
            ("director", self.director.root_chain.metadata_path("root", 1)),
        ):
            state.tuf_dir(name).mkdir(parents=True)  # type: ignore[arg-type]
            shutil.copy(source, state.tuf_dir(name) / "root.json")  # type: ignore[arg-type]
        self.director.add_device(device_id)
        self.identities[device_id] = identity
        return state

    def publish(
        self,
        name: str,
        version: str,
        plaintext: bytes | None = None,
        *,
        card: ModelCard | None = None,
        ciphertext: bytes | None = None,
        content_key: bytes | None = None,
    ) -> Published:
        """Encrypt and sign a model version into the image repository."""
        data = plaintext if plaintext is not None else os.urandom(5 * SEGMENT + 123)
        key = content_key if content_key is not None else new_content_key()
        sealed = (
            ciphertext if ciphertext is not None else encrypt_bytes(data, key, segment_size=SEGMENT)
        )
        card = card or ModelCard(name=name, version=version, format="onnx")
        path = target_path(name, version, card.format)
        encryption = EncryptionInfo(
            scheme="stream-chacha20poly1305-v1",
            segment_size=SEGMENT,
            plaintext_sha256=hashlib.sha256(data).hexdigest(),
            plaintext_length=len(data),
        )
        info = self.image.add_target(path, sealed, ImageTargetCustom(card, encryption).to_dict())
        return Published(path, data, sealed, key, info.length, dict(info.hashes), card)

    def grant(
        self, device_id: str, published: Published, *, sealed_for: str | None = None
    ) -> Grant:
        """A grant of ``published`` sealed to ``sealed_for`` (default: the device itself)."""
        owner = sealed_for or device_id
        return seal_content_key(
            published.content_key,
            self.identities[owner].x25519.public_key(),
            device_id=owner,
            target_path=published.path,
            ciphertext_sha256=published.sha256,
        )

    def assign(
        self,
        device_id: str,
        published: Published,
        *,
        grant: Grant | None = None,
        length: int | None = None,
        hashes: dict[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        """Publish director metadata telling ``device_id`` to run ``published``."""
        custom = DirectorTargetCustom(device_id, grant or self.grant(device_id, published))
        entry = TargetEntry(
            published.length if length is None else length,
            published.hashes if hashes is None else hashes,
            custom.to_dict(),
        )
        self.director.assign(device_id, {path or published.path: entry})

    # -- device side -----------------------------------------------------------------------------

    def state(self, device_id: str) -> DeviceState:
        return DeviceState(self.tmp / "devices" / device_id)

    def client(
        self,
        device_id: str,
        *,
        fetcher: FetcherInterface | None = None,
        limits: UpdateLimits | None = None,
    ) -> DeviceUpdateClient:
        return DeviceUpdateClient(
            self.state(device_id),
            fetcher or LocalDirectoryFetcher(self.repo_dir, stall_timeout=5.0),
            device_id=device_id,
            limits=limits,
        )

    def update(self, device_id: str, **kwargs: Any) -> VerifiedModel:
        """Refresh, verify, decrypt and record the install (what the daemon does)."""
        client = self.client(device_id, **kwargs)
        verified = client.fetch_and_decrypt(client.refresh())
        self.state(device_id).record_install(verified.installed_target())
        return verified

    def installed(self, device_id: str) -> InstallRecord:
        return self.state(device_id).read_installed()

    def decrypt_current(self, device_id: str) -> bytes:
        plaintext, _ = self.state(device_id).decrypt_installed(
            self.identities[device_id], device_id
        )
        return bytes(plaintext)


@pytest.fixture
def world(tmp_path: Path) -> SupplyChainWorld:
    return SupplyChainWorld(tmp_path)


def test_install_then_upgrade_keeps_previous(world: SupplyChainWorld) -> None:
    state = world.add_device("pi-01")
    v1 = world.publish("detector", "1")
    world.assign("pi-01", v1)
    verified = world.update("pi-01")
    assert bytes(verified.plaintext) == v1.plaintext
    assert world.installed("pi-01").current is not None
    assert world.installed("pi-01").current.target_path == v1.path  # type: ignore[union-attr]

    v2 = world.publish("detector", "2")
    world.assign("pi-01", v2)
    world.update("pi-01")
    record = world.installed("pi-01")
    assert record.current is not None and record.current.version == "2"
    assert record.previous is not None and record.previous.version == "1"
    assert world.decrypt_current("pi-01") == v2.plaintext
    previous, _ = state.decrypt_installed(world.identities["pi-01"], "pi-01", "previous")
    assert bytes(previous) == v1.plaintext
    # Only the two installed ciphertexts remain.
    assert sorted(p.name for p in state.models_dir.iterdir()) == sorted(
        [f"{v1.sha256}.enc", f"{v2.sha256}.enc"]
    )


def test_same_target_is_up_to_date(world: SupplyChainWorld) -> None:
    world.add_device("pi-01")
    v1 = world.publish("detector", "1")
    world.assign("pi-01", v1)
    world.update("pi-01")
    world.director.namespace("pi-01").refresh_timestamp()
    plan = world.client("pi-01").refresh()
    assert plan.up_to_date
    assert plan.card.version == "1"


def test_two_devices_get_their_own_grants(world: SupplyChainWorld) -> None:
    world.add_device("pi-01")
    world.add_device("pi-02")
    v1 = world.publish("detector", "1")
    world.assign("pi-01", v1)
    world.assign("pi-02", v1)
    assert bytes(world.update("pi-01").plaintext) == v1.plaintext
    assert bytes(world.update("pi-02").plaintext) == v1.plaintext


def test_a_namespace_signed_before_the_device_binding_updates_once_the_controller_binds_it(
    world: SupplyChainWorld,
) -> None:
    # A controller that predates the signed device_id wrote pi-01's namespace and the device
    # trusted it; then both are upgraded. The device refuses the unbound metadata until the
    # controller's next re-signing binds the namespace, and then updates normally.
    state = world.add_device("pi-01")
    v1 = world.publish("detector", "1")
    world.assign("pi-01", v1)
    ns = world.director.namespace("pi-01")
    for role in ("targets", "snapshot", "timestamp"):
        md = ns.open(role)
        del md.signed.unrecognized_fields["device_id"]
        ns.sign(md, ns.signers(role))
        ns.write(md)
        (state.tuf_dir("director") / f"{role}.json").write_bytes(md.to_bytes())
    assert not ns.is_bound()
    with pytest.raises(NamespaceMismatchError, match="expected signed device_id 'pi-01', got None"):
        world.update("pi-01")
    assert world.director.refresh_timestamps() == ["pi-01"]  # what serve/timestamp refresh do
    assert bytes(world.update("pi-01").plaintext) == v1.plaintext


def test_cli_update_with_a_real_model_runs_the_self_test(
    world: SupplyChainWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    state = world.add_device("pi-01")
    model = (MODELS / "digits_int8.onnx").read_bytes()
    card = card_from_json((MODELS / "digits_int8.onnx.card.json").read_text())
    published = world.publish("digits", "1.0.0", model, card=card)
    world.assign("pi-01", published)

    argv = ["update", "--state", str(state.root), "--repo", str(world.repo_dir), "--json"]
    assert edge_agent(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "installed"
    assert [s["step"] for s in out["steps"]] == [
        "refresh", "target", "download", "unseal", "decrypt", "load", "self-test", "install",
    ]  # fmt: skip
    assert out["ciphertext_sha256"] == published.sha256
    assert world.decrypt_current("pi-01") == model

    assert edge_agent(argv) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "up-to-date"


def test_cli_refuses_a_model_that_fails_its_self_test(
    world: SupplyChainWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    state = world.add_device("pi-01")
    card = card_from_json((MODELS / "digits_int8.onnx.card.json").read_text())
    # Signed and intact, but the model is not what the card's vectors describe.
    model = (MODELS / "digits_int8.onnx").read_bytes()
    fields = card.to_dict()
    for vector in fields["selftest"]:
        vector["expected"] = [value + 100.0 for value in vector["expected"]]
    fields["version"] = "2"
    published = world.publish("digits", "2", model, card=ModelCard.from_dict(fields))
    world.assign("pi-01", published)
    argv = ["update", "--state", str(state.root), "--repo", str(world.repo_dir)]
    assert edge_agent(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-agent: error: self-test failed, nothing installed")
    assert len(err.strip().splitlines()) == 1
    assert world.installed("pi-01").current is None


def test_cli_verification_error_is_one_line_exit_2(
    world: SupplyChainWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    state = world.add_device("pi-01")
    argv = ["update", "--state", str(state.root), "--repo", str(world.repo_dir)]
    assert edge_agent(argv) == 2  # nothing assigned yet
    err = capsys.readouterr().err
    assert "NoUpdateError: director/pi-01: lists no target" in err
    assert len(err.strip().splitlines()) == 1


def test_provisioning_bundle_from_fleetctl_is_a_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = FleetHome(tmp_path / "home")
    home.create(image_thresholds={})
    pack_model(home, MODELS / "digits_int8.onnx", name="digits", version="1.0.0")
    bundle = tmp_path / "bundle"
    enrol_device(home, "pi-07", out_dir=bundle)
    assign_model(home, "pi-07", "digits", "1.0.0")
    argv = ["update", "--state", str(bundle), "--repo", str(home.repo_dir), "--json"]
    assert edge_agent(argv) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "installed"


def test_keygen_writes_private_keys_and_public_document(tmp_path: Path) -> None:
    out = tmp_path / "state"
    assert edge_agent(["keygen", "--out", str(out)]) == 0
    for name in ("x25519.key", "ed25519.key"):
        assert stat.S_IMODE((out / "identity" / name).stat().st_mode) == 0o600
    public = json.loads((out / "public-keys.json").read_text())
    assert DeviceIdentity.load(out / "identity").public_keys().to_dict() == public
    assert edge_agent(["keygen", "--out", str(out)]) == 2  # never overwrites an identity
