"""``lemoe-easyedit``: the command line.

Subcommands:
  demo      the main job: LEMoE lifelong editing on the embedded testbed, before/after table
  run       one method on one data set under the lifelong protocol
  compare   several methods, each in its own process, one combined table and plot
  bench     speed and memory against the baselines (the harness in a checkout's benchmarks/)
A subcommand's module is imported only when that subcommand is named, so ``--help`` and
the subcommand list cost no torch or EasyEdit import.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

#: subcommand -> (module, function adding its arguments, function running it, help)
SUBCOMMANDS = {
    "demo": ("lemoe_easyedit.demo", "add_arguments", "demo_command",
             "LEMoE lifelong editing on the embedded testbed (the main job)"),
    "run": ("lemoe_easyedit.evaluation.runner", "add_run_arguments", "run_command",
            "run one method under the lifelong evaluation protocol"),
    "compare": ("lemoe_easyedit.evaluation.runner", "add_compare_arguments",
                "compare_command", "run several methods on the same edits and tabulate them"),
    "bench": ("lemoe_bench", "add_arguments", "bench_command",
              "time and memory of LEMoE against the baselines (from a checkout)"),
}
#: Where the bench harness lives: benchmarks/ of the checkout this package runs from.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _import_subcommand(name: str):
    module = SUBCOMMANDS[name][0]
    if name == "bench":
        if not (BENCHMARKS_DIR / "lemoe_bench").is_dir():
            raise ImportError(
                "the bench harness is not installed with the package: run it from a clone "
                "of the repository (python benchmarks/bench.py, or lemoe-easyedit bench from "
                f"an editable install); looked in {BENCHMARKS_DIR}")
        if str(BENCHMARKS_DIR) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS_DIR))
    return importlib.import_module(module)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module (if any) is imported to declare its flags."""
    parser = argparse.ArgumentParser(prog="lemoe-easyedit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, add, _, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name != command:
            continue
        try:
            getattr(_import_subcommand(name), add)(p)
        except ImportError as exc:
            p.set_defaults(_unavailable=f"{name} is unavailable: {exc}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``lemoe-easyedit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv) or ["demo"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        parser.error(args._unavailable)
    _, _, run, _ = SUBCOMMANDS[args.command]
    return int(getattr(_import_subcommand(args.command), run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
