"""Devices: enrolment with a provisioning bundle, removal (revocation), and model assignment.

A **provisioning bundle** is a seed of the device's state directory::

    identity/x25519.key, identity/ed25519.key   0600 raw keys (absent with --public-keys)
    tuf/image/root.json                         bootstrap root of the image repository
    tuf/director/root.json                      bootstrap root of the director
    identity/client.crt, client.key, ca.crt     MQTT client certificate (CN = device id, key
                                                0600) and the fleet CA, once a fleet CA exists
                                                (``fleetctl broker config``)
    identity/broker-password                    0600 random password for the embedded broker of
                                                ``fleetctl serve`` (username = device id); the
                                                registry keeps only its scrypt hash
    agent.toml                                  [device] id, [mqtt] password_file and defaults
    device.json                                 {"device_id": ..., "public_keys": {...}}

so ``edge-agent update --state BUNDLE --repo HOME/repo`` works on it directly. The bundle holds
the device's private keys: copy it to the device and delete it.

Assigning seals the model's content key to the device's X25519 key (HPKE, ``info`` bound to the
device id, target path and ciphertext sha256) and makes it the device's only director target,
with the image target's length and hashes. Removed devices get an empty director target list and
no further grants, and, once a fleet CA exists, every client certificate issued to them (the
registry keeps their serials) goes into the CA-signed ``pki/crl.pem`` that ``fleetctl broker
config`` hands to mosquitto (``crlfile``): the broker refuses them after its next restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.atomicio import atomic_write, ensure_private_dir
from agent.supplychain.grants import seal_content_key
from agent.supplychain.identity import DeviceIdentity, DevicePublicKeys
from agent.supplychain.targets import DirectorTargetCustom
from tools.fleetctl import FleetctlError
from tools.fleetctl.broker_acl import hash_password, new_password
from tools.fleetctl.home import FleetHome
from tools.fleetctl.pki import FleetPki, IssuedCertificate
from tools.fleetctl.registry import AssignmentRecord, DeviceRecord
from tools.fleetctl.repository import TargetEntry, check_device_id

__all__ = [
    "DEFAULT_MQTT_URL",
    "DeviceError",
    "EnrolResult",
    "assign_model",
    "enrol_device",
    "issue_device_certificate",
    "parse_model_ref",
    "remove_device",
    "reset_broker_password",
    "write_revocation_list",
]

logger = logging.getLogger(__name__)

_MAX_PUBLIC_KEYS_BYTES = 4096


class DeviceError(FleetctlError):
    """A device cannot be enrolled, removed or assigned as asked."""


@dataclass(frozen=True)
class EnrolResult:
    """The enrolled device and where its bundle went."""

    device: DeviceRecord
    bundle: Path
    has_private_keys: bool


def parse_model_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME@VERSION``."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version or "@" in version:
        raise DeviceError(f"model {ref!r}: expected NAME@VERSION")
    return name, version


DEFAULT_MQTT_URL = "mqtt://localhost:1883"
BROKER_PASSWORD_FILE = "broker-password"  # noqa: S105 - a file name in the identity directory


def _agent_toml(device_id: str, mqtt_url: str, *, tls_files: bool = False) -> str:
    # ca/cert/key/password_file are relative to the credentials directory (<state_dir>/identity
    # by default).
    tls = 'ca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n' if tls_files else ""
    tls += f'password_file = "{BROKER_PASSWORD_FILE}"\n'
    return (
        "# edge-agent configuration written by `fleetctl device add`; edit [mqtt] and [source].\n"
        "[device]\n"
        f'id = "{device_id}"\n'
        'state_dir = "/var/lib/edge-agent"\n'
        "\n[mqtt]\n"
        f"url = {json.dumps(mqtt_url)}\n"
        f"{tls}"
        "\n[source]\n"
        'spec = "0"\n'
    )


def _read_public_keys(path: Path) -> DevicePublicKeys:
    try:
        text = path.read_bytes()[: _MAX_PUBLIC_KEYS_BYTES + 1]
    except OSError as exc:
        raise DeviceError(f"{path}: cannot read public keys ({exc.strerror})") from exc
    data: Any = text
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and "public_keys" in parsed:  # a device.json
        data = json.dumps(parsed["public_keys"])
    return DevicePublicKeys.from_json(data)


def enrol_device(
    home: FleetHome,
    device_id: str,
    *,
    tags: tuple[str, ...] = (),
    out_dir: Path | None = None,
    public_keys_file: Path | None = None,
    mqtt_url: str | None = None,
) -> EnrolResult:
    """Enrol ``device_id``, create its director namespace and write its provisioning bundle.

    Once a fleet CA exists, the bundle also gets the device's MQTT client certificate (its
    serial goes into the registry). ``mqtt_url`` defaults to the TLS broker recorded by
    ``fleetctl broker config`` when a fleet CA exists, else to :data:`DEFAULT_MQTT_URL`.
    """
    check_device_id(device_id)
    for tag in tags:
        if not tag or len(tag) > 64:
            raise DeviceError(f"tag {tag!r}: expected 1-64 characters")
    bundle = out_dir if out_dir is not None else Path.cwd() / f"{device_id}-bundle"
    if bundle.exists() and any(bundle.iterdir()):
        raise DeviceError(f"{bundle}: exists and is not empty; expected a new bundle directory")
    with home.registry() as registry:
        if registry.find_device(device_id) is not None:
            raise DeviceError(f"device {device_id!r} exists already; expected a new device id")
    identity: DeviceIdentity | None = None
    if public_keys_file is not None:
        public = _read_public_keys(public_keys_file)
    else:
        identity = DeviceIdentity.generate()
        public = identity.public_keys()
    image = home.image()
    director = home.director()

    ensure_private_dir(bundle)
    if identity is not None:
        identity.save(bundle / "identity")
    roots = {
        "image": image.metadata_path("root"),
        "director": director.root_chain.metadata_path("root"),
    }
    for name, source in roots.items():
        target_dir = ensure_private_dir(bundle / "tuf" / name)
        atomic_write(target_dir / "root.json", source.read_bytes(), mode=0o644)
    broker_password = new_password()
    identity_dir = ensure_private_dir(bundle / "identity")
    atomic_write(identity_dir / BROKER_PASSWORD_FILE, broker_password + "\n", mode=0o600)
    pki = FleetPki(home.root)
    certificate: IssuedCertificate | None = None
    if pki.exists():
        certificate = pki.issue_client(device_id)
        certificate.write(identity_dir / "client.crt", identity_dir / "client.key")
        atomic_write(identity_dir / "ca.crt", pki.ca_cert_pem(), mode=0o644)
    if mqtt_url is None:
        mqtt_url = pki.broker_url() if certificate is not None else DEFAULT_MQTT_URL
    toml = _agent_toml(device_id, mqtt_url, tls_files=certificate is not None)
    atomic_write(bundle / "agent.toml", toml, mode=0o644)
    device_doc = {"device_id": device_id, "public_keys": public.to_dict()}
    atomic_write(bundle / "device.json", json.dumps(device_doc, indent=2) + "\n", mode=0o644)

    director.add_device(device_id)
    with home.registry() as registry:
        record = registry.add_device(
            device_id, tags=tags, x25519_public=public.x25519, ed25519_public=public.ed25519
        )
        registry.set_broker_credential(device_id, hash_password(broker_password))
        if certificate is not None:
            registry.add_certificate(device_id, certificate.serial_number)
    logger.info("enrolled device %s", device_id)
    return EnrolResult(device=record, bundle=bundle, has_private_keys=identity is not None)


def issue_device_certificate(home: FleetHome, device_id: str) -> IssuedCertificate:
    """Issue a client certificate for an enrolled, active device and record its serial."""
    check_device_id(device_id)
    with home.registry() as registry:
        device = registry.find_device(device_id)
        if device is None or device.removed:
            raise DeviceError(f"device {device_id!r}: expected an enrolled, active device")
        issued = FleetPki(home.root).issue_client(device_id)
        registry.add_certificate(device_id, issued.serial_number)
    logger.info("issued a client certificate for %s", device_id)
    return issued


def reset_broker_password(home: FleetHome, device_id: str) -> str:
    """A new embedded-broker password for an enrolled, active device (its hash replaces the old
    one: the device's open connection is closed at the controller's next reload)."""
    check_device_id(device_id)
    password = new_password()
    with home.registry() as registry:
        device = registry.find_device(device_id)
        if device is None or device.removed:
            raise DeviceError(f"device {device_id!r}: expected an enrolled, active device")
        registry.set_broker_credential(device_id, hash_password(password))
    logger.info("set a new broker password for %s", device_id)
    return password


def write_revocation_list(home: FleetHome) -> Path | None:
    """Regenerate ``pki/crl.pem`` from the registry's revoked certificates; None without a CA."""
    pki = FleetPki(home.root)
    if not pki.exists():
        return None
    with home.registry() as registry:
        revoked = registry.revoked_certificates()
    entries = []
    for certificate in revoked:
        revoked_at = datetime.fromisoformat(str(certificate.revoked_at))
        if revoked_at.tzinfo is None:  # the registry writes UTC
            revoked_at = revoked_at.replace(tzinfo=timezone.utc)
        entries.append((certificate.serial, revoked_at))
    pki.write_crl(entries)
    return pki.crl_path


def remove_device(home: FleetHome, device_id: str) -> DeviceRecord:
    """Revoke a device: no further grants, an empty director target list and, with a fleet CA,
    its client certificates in ``pki/crl.pem``."""
    check_device_id(device_id)
    with home.registry() as registry:
        record = registry.remove_device(device_id)
    director = home.director()
    if director.namespace(device_id).exists():
        director.assign(device_id, {})
    crl = write_revocation_list(home)
    logger.info("removed device %s (certificate revocation list: %s)", device_id, crl or "none")
    return record


def assign_model(home: FleetHome, device_id: str, name: str, version: str) -> AssignmentRecord:
    """Seal a fresh grant of NAME@VERSION for the device and publish its director targets."""
    check_device_id(device_id)
    with home.registry() as registry:
        device = registry.get_device(device_id)
        if device.removed:
            raise DeviceError(f"device {device_id!r} is removed; expected an active device")
        model = registry.get_model(name, version)
        content_key = registry.content_key(name, version)
    image_target = home.image().get_target(model.target_path)
    if image_target is None or image_target.hashes.get("sha256") != model.ciphertext_sha256:
        raise DeviceError(
            f"model {name}@{version}: the image repository does not list {model.target_path}"
            " with the registered ciphertext hash; expected them to agree"
        )
    public = DevicePublicKeys(x25519=device.x25519_public, ed25519=device.ed25519_public)
    grant = seal_content_key(
        content_key,
        public.x25519_key(),
        device_id=device_id,
        target_path=model.target_path,
        ciphertext_sha256=model.ciphertext_sha256,
    )
    custom = DirectorTargetCustom(device_id=device_id, grant=grant)
    entry = TargetEntry(image_target.length, dict(image_target.hashes), custom.to_dict())
    home.director().assign(device_id, {model.target_path: entry})
    with home.registry() as registry:
        assignment = registry.assign(device_id, name, version)
    logger.info("assigned %s@%s to %s", name, version, device_id)
    return assignment
