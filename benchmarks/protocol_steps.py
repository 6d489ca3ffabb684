"""Training steps and seconds of LEMoE's protocol mode, with K-means order planning on and
off (the testbed YAML): the 100-edit blocks of the testbed stream against the whole stream
in one call, each from a fresh model (the bench's protocol mode,
``lemoe_bench.workers._lemoe_protocol``).

Splits the protocol-mode growth of ``bench.py`` into the method's part (training steps per
edit: how soon the planned batches converge) and the rest::

    python benchmarks/protocol_steps.py [--edits 1000] [--block 100]
"""
from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lemoe_bench.workers import _lemoe_protocol  # noqa: E402
from lemoe_easyedit.evaluation import load_hparams  # noqa: E402
from lemoe_easyedit.testbed import testbed_edit_set, testbed_model_path, to_requests  # noqa: E402

HPARAMS = os.path.join(os.path.dirname(__file__), "..", "hparams", "LEMoE", "testbed-llama.yaml")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--block", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    requests = to_requests(testbed_edit_set(args.edits, seed=args.seed))
    base = load_hparams("LEMoE", HPARAMS)
    base.model_name, base.max_experts = str(testbed_model_path()), None
    base.batch_size = max(base.batch_size, args.edits)
    job = {"stream": [args.block, args.edits]}
    print("| order planning | T | runs | seconds | s / edit | training steps / edit | ms / step |")
    print("|---|---|---|---|---|---|---|")
    for planning in (True, False):
        hp = dataclasses.replace(base, order_planning=planning)
        for entry in _lemoe_protocol(job, hp, requests):
            runs = len(entry["blocks"])
            print(f"| {'on' if planning else 'off'} | {entry['T']} | {runs} | "
                  f"{entry['seconds'] * runs:.2f} | {entry['seconds_per_edit']:.5f} | "
                  f"{entry['steps_per_edit']:.3f} | {1000 * entry['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
