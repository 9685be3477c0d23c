"""The supply chain's exceptions: one root, one subclass per failure domain.

Every message is one line saying what was wrong and what was expected ("expected X, got Y").
Messages never contain key material or plaintext.
"""

from __future__ import annotations

__all__ = [
    "DecryptionError",
    "EndlessDataError",
    "ExpiredMetadataError",
    "FetchError",
    "GrantError",
    "IdentityError",
    "MetadataError",
    "NamespaceMismatchError",
    "NoUpdateError",
    "ReportError",
    "RollbackError",
    "SignatureError",
    "SlowRetrievalError",
    "StateError",
    "SupplyChainError",
    "TargetHashError",
    "TargetMetadataError",
    "TargetMismatchError",
    "VerificationError",
]


class SupplyChainError(Exception):
    """Root of every supply-chain error."""


class DecryptionError(SupplyChainError):
    """An encrypted model is malformed, truncated, reordered, spliced or tampered with."""


class GrantError(SupplyChainError):
    """A key grant is malformed or was not sealed for this device, target and ciphertext."""


class ReportError(SupplyChainError):
    """A signed device report is malformed or its signature does not verify."""


class IdentityError(SupplyChainError):
    """A device identity (key files, public-key document) is missing or malformed."""


class StateError(SupplyChainError):
    """The device state directory is missing something or holds malformed records."""


class VerificationError(SupplyChainError):
    """Repository metadata or a target failed verification; nothing was installed."""


class TargetMetadataError(VerificationError):
    """A target's signed ``custom`` data (model card, encryption, grant) is malformed."""


class TargetMismatchError(VerificationError):
    """The director and the image repository disagree about a target (mix-and-match)."""


class NoUpdateError(VerificationError):
    """The director lists nothing this device can install."""


class MetadataError(VerificationError):
    """Repository metadata failed TUF verification (signatures, versions, expiry, format)."""


class NamespaceMismatchError(MetadataError):
    """Director metadata does not name this device in its signed part (another namespace's)."""


class SignatureError(MetadataError):
    """Metadata lacks a threshold of valid signatures from the keys its delegator trusts."""


class RollbackError(MetadataError):
    """Metadata is older than what the device already trusts (replay / rollback)."""


class ExpiredMetadataError(MetadataError):
    """Metadata has expired (freeze attack or a controller that stopped re-signing)."""


class TargetHashError(VerificationError):
    """A downloaded target's length or hashes differ from its signed metadata."""


class FetchError(VerificationError):
    """A repository file could not be fetched (missing, unreachable)."""


class EndlessDataError(FetchError):
    """A repository file is longer than its signed (or configured maximum) length."""


class SlowRetrievalError(FetchError):
    """A repository read stalled longer than allowed."""
