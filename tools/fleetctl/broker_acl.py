"""Embedded broker authentication and ACL rules, with mosquitto's semantics.

:class:`BrokerAuth` is a username -> password-hash table plus :class:`AclRule` lines (a rule
with a ``user`` is mosquitto's ``topic`` under ``user``; without one it is a ``pattern`` line
where ``%u`` is the username). :func:`fleet_acl_rules` gives the fleet's rules, shared with the
mosquitto ACL file that ``fleetctl broker config`` writes.

Passwords are random (:func:`new_password`, 256 bits) and stored only as salted scrypt hashes
(:func:`hash_password`, ``scrypt$N$r$p$salt$hash``); :meth:`BrokerAuth.login_ok` remembers a
keyed digest of the last password that verified per user, so a reconnecting client costs one
HMAC, not one scrypt. The controller's own password lives in ``HOME/broker-password`` (0600,
:func:`controller_password`): it needs the plain password to log in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.atomicio import atomic_write
from agent.protocol.topics import Topics, topic_matches

__all__ = [
    "CONTROLLER_PASSWORD_FILE",
    "Access",
    "AclRule",
    "BrokerAuth",
    "controller_password",
    "fleet_acl_rules",
    "hash_password",
    "new_password",
    "verify_password",
]

Access = Literal["read", "write", "readwrite"]

CONTROLLER_PASSWORD_FILE = "broker-password"  # noqa: S105 - a file name
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_MAX_PASSWORD_BYTES = 1024


def new_password() -> str:
    """A random broker password (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 1024 * 1024)


def hash_password(password: str) -> str:
    """A salted scrypt hash of ``password``: ``scrypt$N$r$p$salt$hash`` (base64 fields)."""
    salt = os.urandom(16)
    digest = _scrypt(password.encode(), salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    encoded = [base64.b64encode(v).decode("ascii") for v in (salt, digest)]
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${encoded[0]}${encoded[1]}"


def verify_password(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches a :func:`hash_password` string (False if it is malformed)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or len(password) > _MAX_PASSWORD_BYTES:
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
        if not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)
    except ValueError:
        return False


def controller_password(home_root: Path) -> str:
    """The controller's broker password (``HOME/broker-password``, 0600), created if missing."""
    path = home_root / CONTROLLER_PASSWORD_FILE
    if not path.exists():
        atomic_write(path, new_password() + "\n", mode=0o600)
    return path.read_text(encoding="ascii").strip()


@dataclass(frozen=True)
class AclRule:
    """One ACL line: ``user`` set = mosquitto ``topic`` under ``user``; None = ``pattern`` (all)."""

    access: Access
    topic: str
    user: str | None = None

    def filter_for(self, username: str) -> str | None:
        """The topic filter this rule grants ``username``, or None if it does not apply."""
        if self.user is not None:
            return self.topic if self.user == username else None
        if any(c in username for c in "/+#"):
            return None  # mosquitto refuses substitution of such names
        return self.topic.replace("%u", username)


@dataclass(frozen=True)
class BrokerAuth:
    """Who may connect (username -> :func:`hash_password` hash), what they may read and write.

    A client's id must be its username, except for the users in ``free_client_ids`` (the
    controller, which runs several clients).
    """

    password_hashes: Mapping[str, str]
    rules: tuple[AclRule, ...] = ()
    free_client_ids: frozenset[str] = frozenset()
    _verified: dict[str, tuple[str, bytes]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _cache_key: bytes = field(
        default_factory=lambda: os.urandom(32), init=False, repr=False, compare=False
    )
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @classmethod
    def from_passwords(
        cls,
        passwords: Mapping[str, str],
        rules: tuple[AclRule, ...] = (),
        free_client_ids: frozenset[str] = frozenset(),
    ) -> BrokerAuth:
        """Hash plain passwords (for a controller's own credential and tests)."""
        hashes = {user: hash_password(password) for user, password in passwords.items()}
        return cls(hashes, rules, free_client_ids)

    def login_ok(self, username: str | None, password: bytes | None) -> bool:
        """Whether the CONNECT credentials are known (may take one scrypt: call off the loop)."""
        if username is None or password is None or username not in self.password_hashes:
            return False
        stored = self.password_hashes[username]
        digest = hmac.new(self._cache_key, password, hashlib.sha256).digest()
        with self._lock:
            cached = self._verified.get(username)
        if cached is not None and cached[0] == stored and hmac.compare_digest(cached[1], digest):
            return True
        if not verify_password(stored, password):
            return False
        with self._lock:
            self._verified[username] = (stored, digest)
        return True

    def client_id_ok(self, username: str | None, client_id: str) -> bool:
        """Whether ``username`` may use ``client_id`` (its own name, unless a free user)."""
        return username is not None and (client_id == username or username in self.free_client_ids)

    def allows(self, username: str, topic: str, access: Literal["read", "write"]) -> bool:
        """Whether ``username`` may ``access`` topic name ``topic``."""
        for rule in self.rules:
            if access not in rule.access:
                continue
            topic_filter = rule.filter_for(username)
            if topic_filter is not None and topic_matches(topic_filter, topic):
                return True
        return False


def fleet_acl_rules(topics: Topics, *, controller_user: str = "fleetctl") -> tuple[AclRule, ...]:
    """The fleet's ACL: the controller reads/writes the whole prefix, devices their own topics."""
    writable, readable = topics.device_acl_patterns(placeholder="%u")
    return (
        AclRule("readwrite", f"{topics.prefix}/#", user=controller_user),
        *(AclRule("write", t) for t in writable),
        *(AclRule("read", t) for t in readable),
    )
