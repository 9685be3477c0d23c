"""``edge-agent update``: fetch, verify, decrypt, self-test and install what the director says.

Reads the repositories from a directory laid out like a controller's ``repo/`` (``image/`` and
``director/{device}/``), verifies both with TUF (signatures, thresholds, versions, expiry,
lengths), requires the director's target to match the image repository's, opens the key grant,
decrypts the model in memory, loads it with the card's runtime and runs the card's self-test.
Only then is ``installed.json`` updated (the old model becomes ``previous``).

exit status: 0 installed or already up to date; 2 on any verification, runtime or self-test
error (one line on stderr; with --json also one JSON object on stdout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.cli import CliError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``update`` sub-command."""
    parser = subparsers.add_parser(
        "update",
        help="verify and install the model the director assigns to this device",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--state", required=True, metavar="DIR", help="device state directory")
    parser.add_argument("--repo", required=True, metavar="DIR", help="repository root (repo/)")
    parser.add_argument("--device-id", metavar="ID", help="default: [device] id of DIR/agent.toml")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="fail a read that makes no progress for S seconds (default 30)",
    )
    parser.set_defaults(func=run)


class _Steps:
    """Collects what was done, printed as it happens (text) or at the end (JSON)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {"steps": []}

    def step(self, name: str, text: str, **fields: Any) -> None:
        self.data["steps"].append({"step": name, **fields})
        if not self.as_json:
            print(f"{name:<10} {text}", flush=True)


def run(args: Any) -> int:
    """Run one update; see the module docstring for the exit statuses."""
    steps = _Steps(args.json)
    try:
        status = _update(args, steps)
    except CliError as exc:
        if args.json:
            print(json.dumps({**steps.data, "status": "failed", "error": str(exc)}))
        raise
    if args.json:
        print(json.dumps({**steps.data, "status": status}, sort_keys=True))
    return 0


def _update(args: Any, steps: _Steps) -> str:
    from agent.pipeline.selftest import run_self_test  # noqa: PLC0415 - tuf, runtimes: keeps `edge-agent --help` light
    from agent.runtime import ModelRuntimeError, RuntimeMissingError, load_model  # noqa: PLC0415
    from agent.supplychain.errors import SupplyChainError  # noqa: PLC0415
    from agent.supplychain.fetcher import LocalDirectoryFetcher  # noqa: PLC0415
    from agent.supplychain.store import DeviceState  # noqa: PLC0415
    from agent.supplychain.verify import DeviceUpdateClient  # noqa: PLC0415

    state = DeviceState(args.state)
    try:
        device_id = args.device_id or state.device_id()
        fetcher = LocalDirectoryFetcher(Path(args.repo), stall_timeout=args.stall_timeout)
        client = DeviceUpdateClient(state, fetcher, device_id=device_id)
        plan = client.refresh()
    except SupplyChainError as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from exc
    card = plan.card
    steps.data.update(
        device_id=device_id,
        target=plan.target_path,
        name=card.name,
        version=card.version,
        format=card.format,
        ciphertext_length=plan.length,
        ciphertext_sha256=plan.sha256,
    )
    steps.step(
        "refresh",
        f"director/{device_id} and image metadata verified",
        device_id=device_id,
    )
    steps.step(
        "target",
        f"{plan.target_path} ({card.name} {card.version}, {card.format}); director and image"
        " agree on length and hashes",
        target=plan.target_path,
    )
    if plan.up_to_date:
        steps.step("done", f"already up to date with {card.name} {card.version}")
        return "up-to-date"
    try:
        verified = client.fetch_and_decrypt(plan)
    except SupplyChainError as exc:
        raise CliError(f"{type(exc).__name__}: {exc}") from exc
    encryption = plan.image.encryption
    steps.step(
        "download",
        f"{plan.length} bytes of ciphertext, sha256 {plan.sha256} (signed)",
        length=plan.length,
        sha256=plan.sha256,
    )
    steps.step("unseal", f"content key grant opened for {device_id}")
    steps.step(
        "decrypt",
        f"{len(verified.plaintext)} bytes in memory, sha256 {encryption.plaintext_sha256} (signed)",
        length=len(verified.plaintext),
        sha256=encryption.plaintext_sha256,
    )
    try:
        model = load_model(bytes(verified.plaintext), format=card.format)
    except RuntimeMissingError as exc:
        raise CliError(f"no runtime for {card.format} is installed: {exc}") from exc
    except ModelRuntimeError as exc:
        raise CliError(f"{card.format} model did not load: {exc}") from exc
    try:
        steps.step("load", f"{card.format} model loaded with {model.runtime_name}")
        report = run_self_test(model, card)
    finally:
        model.close()
    passed = sum(1 for r in report.results if r.passed)
    if not report.passed:
        failed = next(r for r in report.results if not r.passed)
        raise CliError(f"self-test failed, nothing installed: {failed.detail}")
    if report.results:
        steps.step("self-test", f"{passed}/{len(report.results)} vectors passed", vectors=passed)
    else:
        steps.step("self-test", "the card has no self-test vectors; loading was the only check")
    record = state.record_install(verified.installed_target())
    previous = record.previous
    steps.step(
        "install",
        f"recorded {card.name} {card.version} in {state.installed_path}"
        + (f" (previous: {previous.card.name} {previous.version})" if previous else ""),
        previous=previous.target_path if previous else None,
    )
    return "installed"
