"""Binding director metadata to one device: a fetcher that refuses another namespace's files.

Every device namespace of the director is signed by the same director keys, so a signature alone
does not say whose metadata it is. The controller therefore puts ``"device_id": "<id>"`` into the
signed part of every timestamp, snapshot and targets it writes in a namespace
(:data:`DEVICE_ID_FIELD`; python-tuf keeps it as an unrecognized field and signs it). Roots are
one chain shared by every namespace and carry no device id.

:class:`DirectorNamespaceFetcher` wraps the fetcher of the director ``Updater``: each timestamp,
snapshot and targets file is parsed (already bounded by ngclient's per-role maximum length) and
handed to ngclient only if its signed ``device_id`` is this device's. A file that is not JSON,
has no ``device_id`` or names another device raises
:class:`~agent.supplychain.errors.NamespaceMismatchError` before ngclient can verify, trust and
persist it, so a broker serving device B's newer versions to device A cannot push A's trusted
versions above A's own metadata (a permanent freeze). ngclient still verifies the signatures,
versions and expiry of what passes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tuf.ngclient.fetcher import FetcherInterface

from agent.supplychain import errors

__all__ = ["DEVICE_ID_FIELD", "DirectorNamespaceFetcher", "check_device_binding"]

DEVICE_ID_FIELD = "device_id"
_ROOT_FILE = re.compile(r"[1-9][0-9]*\.root\.json")
_MAX_SHOWN = 80


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]}..."


def check_device_binding(data: bytes, device_id: str, what: str) -> None:
    """Raise unless ``data`` is metadata whose ``signed.device_id`` equals ``device_id``.

    Only the binding is checked here; signatures, versions and expiry are ngclient's job.

    Raises:
        NamespaceMismatchError: not JSON metadata, or no/another device id in its signed part.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # bad UTF-8/JSON, over-long integers, deep nesting
        raise errors.NamespaceMismatchError(
            f"{what}: expected JSON metadata with signed device_id {device_id!r}, got"
            " unparseable bytes"
        ) from None
    signed = document.get("signed") if isinstance(document, dict) else None
    bound = signed.get(DEVICE_ID_FIELD) if isinstance(signed, dict) else None
    if bound != device_id:
        raise errors.NamespaceMismatchError(
            f"{what}: expected signed device_id {device_id!r}, got {_shown(bound)}"
        )


class DirectorNamespaceFetcher(FetcherInterface):  # type: ignore[misc]
    """The director ``Updater``'s fetcher: passes on only metadata bound to ``device_id``.

    Args:
        inner: the transport (local directory, MQTT); its length bounds and errors are kept.
        device_id: this device's id.
        base_url: the namespace's metadata URL (``repo://director/{device_id}/metadata/``).
    """

    def __init__(self, inner: FetcherInterface, *, device_id: str, base_url: str) -> None:
        self.inner = inner
        self.device_id = device_id
        self.base_url = base_url

    def _fetch(self, url: str) -> Iterator[bytes]:
        chunks: Iterator[bytes] = self.inner.fetch(url)
        return chunks

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Download through the inner fetcher; check the binding of every non-root file.

        ngclient reads all metadata with ``download_bytes`` (``download_file`` is for targets,
        which a director ``Updater`` never downloads).
        """
        data: bytes = self.inner.download_bytes(url, max_length)
        name = url[len(self.base_url) :] if url.startswith(self.base_url) else url
        if _ROOT_FILE.fullmatch(name) is None:
            check_device_binding(data, self.device_id, f"director/{self.device_id} {name[:80]}")
        return data
