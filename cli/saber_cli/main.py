"""The `saber` command.

Each component owns its subcommands in its own `cli` module (a `register(subparsers)` function),
so a component's heavy imports happen only when its subcommand runs, and a component whose
optional dependencies are not installed does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMPONENT_CLIS = (
    "saber_emulator.cli",
    "saber_sidecar.cli",
    "saber_bench.cli",
    "saber_bench.calibrate_cli",
    "saber_operator.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saber",
        description="SLA-aware serving of code LLMs: engine emulator, admission sidecar, "
        "benchmark and Kubernetes operator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMPONENT_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only skip a component that is absent; a missing dependency inside it is a real error.
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
