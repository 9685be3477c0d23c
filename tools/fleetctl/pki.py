"""The fleet PKI: one EC P-256 CA in the controller home, and the certificates it issues.

Layout in the home (the directory is 0700)::

    pki/ca.key, pki/ca.crt             the fleet CA (key 0600); created once, never replaced
    pki/fleetctl.crt, fleetctl.key     the controller's client certificate (CN ``fleetctl``)
    pki/broker.json                    where devices reach the broker: {"hosts": [...], "port": N}
    pki/crl.pem                        the CRL: client certificates of removed devices

Certificates: the CA is valid for 10 years (path length 0); the broker's server certificate
(SAN DNS names / IP addresses, serverAuth) for 825 days; client certificates (CN = broker
username, i.e. the device id or ``fleetctl``; clientAuth) for 5 years. Every private key is
written 0600 through :func:`agent.atomicio.atomic_write`.

The CRL is signed by the CA and rewritten whole from the list of revoked serials it is given
(``fleetctl device remove`` and ``fleetctl broker config`` do so), with a CRL number one above
the previous file's and a next update :data:`CRL_VALIDITY` ahead. A broker that checks CRLs
(mosquitto ``crlfile``) refuses *every* client once that date passes, so the CRL must be
regenerated (``fleetctl broker config``) and reloaded before then.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.atomicio import atomic_write, ensure_private_dir
from tools.fleetctl import FleetctlError

__all__ = [
    "CONTROLLER_USER",
    "CRL_VALIDITY",
    "DEFAULT_BROKER_HOSTS",
    "DEFAULT_BROKER_PORT",
    "FleetPki",
    "IssuedCertificate",
    "PkiError",
]

logger = logging.getLogger(__name__)

CONTROLLER_USER = "fleetctl"
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_BROKER_PORT = 8883
_CA_DAYS, _SERVER_DAYS, _CLIENT_DAYS = 3650, 825, 5 * 365
_BACKDATE = datetime.timedelta(minutes=5)  # tolerate clocks slightly behind the controller's
CRL_VALIDITY = datetime.timedelta(days=365)


class PkiError(FleetctlError):
    """The fleet CA is missing or damaged, or a certificate was asked for with bad names."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def serial_number(self) -> int:
        """The certificate's serial number (what a CRL lists)."""
        return x509.load_pem_x509_certificate(self.cert_pem).serial_number

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600)."""
        atomic_write(cert_path, self.cert_pem, mode=0o644)
        atomic_write(key_path, self.key_pem, mode=0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (
        not host
        or len(host) > 253
        or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        )
    ):
        raise PkiError(f"broker host {host!r}: expected a DNS name or an IP address")
    return x509.DNSName(host.lower())


class FleetPki:
    """The fleet CA under ``HOME/pki`` and the certificates it signs."""

    def __init__(self, home_root: Path, *, clock: type[datetime.datetime] = datetime.datetime):
        self.directory = Path(home_root) / "pki"
        self._clock = clock

    @property
    def ca_cert_path(self) -> Path:
        """The CA certificate (public; goes to the broker and every device)."""
        return self.directory / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """The CA private key (0600; never leaves the home)."""
        return self.directory / "ca.key"

    @property
    def controller_cert_path(self) -> Path:
        """The controller's client certificate."""
        return self.directory / f"{CONTROLLER_USER}.crt"

    @property
    def controller_key_path(self) -> Path:
        """The controller's client key (0600)."""
        return self.directory / f"{CONTROLLER_USER}.key"

    @property
    def broker_info_path(self) -> Path:
        """``broker.json``: the hosts and port written by ``fleetctl broker config``."""
        return self.directory / "broker.json"

    @property
    def crl_path(self) -> Path:
        """``crl.pem``: the CA-signed list of revoked client certificates."""
        return self.directory / "crl.pem"

    def exists(self) -> bool:
        """Whether a fleet CA was created."""
        return self.ca_cert_path.is_file() and self.ca_key_path.is_file()

    def _now(self) -> datetime.datetime:
        return self._clock.now(datetime.timezone.utc)

    def ensure_ca(self) -> bool:
        """Create the CA unless it exists; True when it was created now."""
        if self.exists():
            return False
        ensure_private_dir(self.directory)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge fleet CA")])
        now = self._now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(self.ca_key_path, _key_pem(key), mode=0o600)
        atomic_write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        logger.info("created the fleet CA in %s", self.directory)
        return True

    def ca_cert_pem(self) -> bytes:
        """The CA certificate as PEM."""
        return self._load_ca()[1].public_bytes(serialization.Encoding.PEM)

    def _load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.exists():
            raise PkiError(
                f"{self.directory}: no fleet CA; expected `fleetctl broker config` to create it"
            )
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"{self.directory}: the fleet CA cannot be loaded: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path}: expected an EC private key")
        return key, cert

    def _issue(
        self,
        common_name: str,
        *,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName] = (),
    ) -> IssuedCertificate:
        ca_key, ca_cert = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def issue_server(self, hosts: Sequence[str]) -> IssuedCertificate:
        """A broker certificate valid for ``hosts`` (DNS names and/or IP addresses)."""
        if not hosts:
            raise PkiError("broker hosts: expected at least one DNS name or IP address")
        names = [_general_name(h) for h in hosts]
        return self._issue(
            hosts[0], days=_SERVER_DAYS, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=names
        )

    def issue_client(self, username: str) -> IssuedCertificate:
        """A client certificate whose CN is the broker username (device id or ``fleetctl``)."""
        if not username or any(c in username for c in "/+#") or len(username) > 64:
            raise PkiError(f"client name {username!r}: expected 1-64 characters without / + #")
        return self._issue(username, days=_CLIENT_DAYS, usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    def ensure_controller_cert(self) -> bool:
        """Issue the controller's client certificate into the home unless present; True if new."""
        if self.controller_cert_path.is_file() and self.controller_key_path.is_file():
            return False
        self.issue_client(CONTROLLER_USER).write(
            self.controller_cert_path, self.controller_key_path
        )
        return True

    def _previous_crl_number(self) -> int:
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return 0
        return int(number.crl_number)

    def write_crl(
        self, revoked: Sequence[tuple[int, datetime.datetime]]
    ) -> x509.CertificateRevocationList:
        """Sign and write ``crl.pem`` listing ``revoked`` (serial, revocation time) pairs.

        Raises:
            PkiError: no fleet CA, or a revocation time without a timezone.
        """
        ca_key, ca_cert = self._load_ca()
        now = self._now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + CRL_VALIDITY)
            .add_extension(x509.CRLNumber(self._previous_crl_number() + 1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        for serial, revoked_at in revoked:
            if revoked_at.tzinfo is None:
                raise PkiError(f"revocation time {revoked_at}: expected a timezone-aware time")
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca_key, hashes.SHA256())
        ensure_private_dir(self.directory)
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        logger.info("wrote %s (%d revoked certificates)", self.crl_path, len(revoked))
        return crl

    def save_broker_info(self, hosts: Sequence[str], port: int) -> None:
        """Remember where devices reach the broker (used by ``fleetctl device add``)."""
        doc = {"hosts": list(hosts), "port": port}
        atomic_write(self.broker_info_path, json.dumps(doc, indent=2) + "\n", mode=0o644)

    def broker_url(self) -> str:
        """``mqtts://HOST:PORT`` for devices: the first host given to ``broker config``."""
        try:
            doc = json.loads(self.broker_info_path.read_text())
            host, port = str(doc["hosts"][0]), int(doc["port"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            host, port = DEFAULT_BROKER_HOSTS[0], DEFAULT_BROKER_PORT
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"mqtts://{host}:{port}"
