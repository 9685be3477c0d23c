"""``python -m tools.bench SUITE``: run one benchmark suite (or ``all``) and print its tables.

Each suite is a module ``tools.bench.<suite>`` with a ``main(argv) -> int`` function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "pipeline": "edge-agent run vs a hand-written capture/infer loop; overhead; memory",
    "supplychain": "streaming decrypt+verify vs one-shot decrypt; packing a 20 MiB model",
    "delivery": "20 MiB model delivered over MQTT end to end vs a raw paho transfer",
    "fleet": "hot model swap during a running video (dropped frames, longest gap); daemon RSS",
}


def main(argv: list[str] | None = None) -> int:
    """Parse the suite name and run it."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which benchmark to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options for the suite")
    args = parser.parse_args(argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    status = 0
    for name in names:
        print(f"== {name}: {SUITES[name]}")
        module = importlib.import_module(f"tools.bench.{name}")
        status |= int(module.main(args.rest))
    return status


if __name__ == "__main__":
    sys.exit(main())
