"""``lemoe-easyedit``: the command line.

Subcommands:
  demo      the main job: LEMoE lifelong editing on the embedded testbed, before/after table
  run       one method on one data set under the lifelong protocol
  compare   several methods, each in its own process, one combined table and plot
  bench     speed and memory against the baselines
Each subcommand's module is imported only when it runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: subcommand -> (module, function adding its arguments, function running it, help)
SUBCOMMANDS = {
    "demo": ("lemoe_easyedit.demo", "add_arguments", "demo_command",
             "LEMoE lifelong editing on the embedded testbed (the main job)"),
    "run": ("lemoe_easyedit.runner", "add_run_arguments", "run_command",
            "run one method under the lifelong evaluation protocol"),
    "compare": ("lemoe_easyedit.runner", "add_compare_arguments", "compare_command",
                "run several methods on the same edits and tabulate them"),
    "bench": ("lemoe_easyedit.bench", "add_arguments", "bench_command",
              "time and memory of LEMoE against the baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subcommand's module is imported to declare its flags."""
    parser = argparse.ArgumentParser(prog="lemoe-easyedit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, _, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        try:
            getattr(importlib.import_module(module), add)(p)
        except ImportError as exc:
            p.set_defaults(_unavailable=f"{name} is unavailable: {exc}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``lemoe-easyedit`` console script."""
    argv = (sys.argv[1:] if argv is None else argv) or ["demo"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        parser.error(args._unavailable)
    module, _, run, _ = SUBCOMMANDS[args.command]
    return int(getattr(importlib.import_module(module), run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
