"""The `unhype` command line: one subcommand per job, each registered by its own module.

A module listed in SUBCOMMAND_MODULES exposes `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed args, returns an exit code). Heavy imports happen inside
`func`, so `unhype --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from unhype.errors import UnHypeError

SUBCOMMAND_MODULES = (
    "unhype.commands.inspect_cmd",
    "unhype.commands.bake_cmd",
    "unhype.commands.stamp_cmd",
    "unhype.toy.cli",
    "unhype.trainer.cli",
    "unhype.evaluation.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unhype",
        description="Concept erasure with CLIP-guided hypernetworks (dynamic LoRA).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part of the product is not installed/built yet
            raise
        module.register(subparsers)
    return parser


def quiet_unused_libraries() -> None:
    """transformers / diffusers import bitsandbytes whenever it is installed (the tests use it
    for Forge's NF4 layers), and on a CPU without its optional kernels it logs a warning at
    import. No unhype command uses bitsandbytes, so its warnings are noise here; errors stay."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_unused_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UnHypeError as exc:
        print(f"unhype {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unhype {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the machine's side (disk full, permissions): a message, not a trace
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"unhype {args.command}: error: {exc.strerror or exc}{where}; what was written "
              "before is kept, no file was half-written", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
