"""Embedded broker authentication and ACL rules, with mosquitto's semantics.

:class:`BrokerAuth` is a username/password table plus :class:`AclRule` lines (a rule with a
``user`` is mosquitto's ``topic`` under ``user``; without one it is a ``pattern`` line where
``%u`` is the username). :func:`fleet_acl_rules` gives the fleet's rules, shared with the
mosquitto ACL file that ``fleetctl broker config`` writes.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.protocol.topics import Topics, topic_matches

__all__ = ["Access", "AclRule", "BrokerAuth", "fleet_acl_rules"]

Access = Literal["read", "write", "readwrite"]


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
    """Who may connect (username -> password) and what they may read and write."""

    passwords: Mapping[str, str]
    rules: tuple[AclRule, ...] = ()

    def login_ok(self, username: str | None, password: bytes | None) -> bool:
        """Whether the CONNECT credentials are known."""
        if username is None or username not in self.passwords:
            return False
        return hmac.compare_digest(self.passwords[username].encode(), password or b"")

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
