"""The bench's arguments and entry points (``lemoe-easyedit bench``, ``python benchmarks/bench.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .inputs import METHODS, TESTBED_HPARAMS
from .report import markdown
from .run import run_bench
from .workers import _run_worker

# ----------------------------------------------------------------------- arguments


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by ``lemoe-easyedit bench``)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="model directory or hub name (default: the embedded testbed; a tiny "
                        "LLaMA of its shape is built if it is missing)")
    g.add_argument("--data-path", default=None,
                   help="JSON list of EasyEdit requests (default: the testbed's edit set, or "
                        "synthetic edits for another model)")
    g.add_argument("--hparams-name", default=None,
                   help="use hparams/<METHOD>/<NAME>.yaml where it exists (default: "
                        f"{TESTBED_HPARAMS} for the testbed); other methods get generated "
                        "hparams")
    g.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"methods to time (default: {' '.join(METHODS)}); LEMoE is always run")
    s = parser.add_argument_group("sizes")
    s.add_argument("--stream", type=_int_list, default=[100, 1000], metavar="T1,T2",
                   help="LEMoE stream lengths at which the time per edit is reported; the "
                        "stream runs to the largest (default: 100,1000)")
    s.add_argument("--window", type=int, default=100,
                   help="edits before each T over which its time per edit is averaged "
                        "(default 100, at most the smallest T)")
    s.add_argument("--edits-per-expert", type=int, default=10,
                   help="edits per LEMoE call, one expert each (default 10: 100 experts at "
                        "T=1000)")
    s.add_argument("--experts", type=_int_list, default=[1, 5, 20, 100], metavar="N1,N2",
                   help="numbers of experts at which serving cost is measured "
                        "(default: 1,5,20,100)")
    s.add_argument("--baseline-edits", type=int, default=100,
                   help="edits timed for ROME, MEMIT and FT (default 100: their cost per edit "
                        "does not depend on how many edits came before)")
    s.add_argument("--grace-edits", type=int, default=None,
                   help="edits timed for GRACE (default: the longest --stream; its codebook "
                        "grows with the stream)")
    s.add_argument("--train-edits", type=int, default=100,
                   help="edits trained both ways to compare cached-activation and "
                        "full-forward training (default 100)")
    s.add_argument("--latency-prompts", type=int, default=16,
                   help="prompts timed per latency measurement (half edited, half not)")
    s.add_argument("--gen-tokens", type=int, default=16, help="tokens generated per prompt")
    s.add_argument("--repeats", type=int, default=30,
                   help="interleaved repetitions of each latency measurement (best taken; "
                        "default 30)")
    s.add_argument("--rounds", type=int, default=2,
                   help="rounds of editing timings: after the first round (every method's "
                        "whole job), each later round times every method's editing again "
                        "(same edits, fresh model), in the same order; each method's time "
                        "is its fastest round (default 2)")
    r = parser.add_argument_group("run")
    r.add_argument("--out", default="bench-results", help="output directory")
    r.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every process (default 1; recorded)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=int, default=7200,
                   help="seconds allowed to each subprocess")
    r.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------- entry points


def bench_command(args: argparse.Namespace) -> int:
    """``lemoe-easyedit bench``: run, print the markdown, return the exit status."""
    if getattr(args, "worker", None):
        return _run_worker(args.worker)
    if not getattr(args, "_command", None):
        args._command = [Path(sys.argv[0]).name] + sys.argv[1:]
    res = run_bench(args)
    print(markdown(res))
    print(f"results: {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    failed = [m for m, r in res["methods"].items() if r.get("status") == "error"]
    if res["training"].get("status") == "error":
        failed.append("training")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._command = ["python", "benchmarks/bench.py"] + argv
    return bench_command(args)


if __name__ == "__main__":
    sys.exit(main())
