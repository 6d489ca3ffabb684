"""Training steps and seconds of LEMoE's protocol mode: the ten 100-edit blocks of the
testbed stream against the whole 1000-edit stream in one call, each from a fresh model.

Splits the protocol-mode growth of ``bench.py`` into the method's part (training steps
per edit: how soon the planned batches converge) and the rest, with order planning on
(the testbed YAML) and off::

    python benchmarks/protocol_steps.py [--edits 1000] [--block 100]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lemoe_easyedit.editing import apply_lemoe_to_model  # noqa: E402
from lemoe_easyedit.evaluation import load_hparams, load_model_and_tokenizer  # noqa: E402
from lemoe_easyedit.injection import find_adaptor  # noqa: E402
from lemoe_easyedit.testbed import testbed_edit_set, testbed_model_path, to_requests  # noqa: E402

HPARAMS = os.path.join(os.path.dirname(__file__), "..", "hparams", "LEMoE", "testbed-llama.yaml")


def edit_from_fresh_model(hp, requests) -> tuple:
    """``(seconds, training steps)`` of one edit call on a freshly loaded model."""
    model, tok = load_model_and_tokenizer(hp)
    t0 = time.perf_counter()
    model, _ = apply_lemoe_to_model(model, tok, [copy.deepcopy(r) for r in requests], hp)
    seconds = time.perf_counter() - t0
    return seconds, sum(e.get("steps", 0) for e in find_adaptor(model).history)


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
    print("| order planning | T | calls | seconds | s / edit | training steps | steps / edit |")
    print("|---|---|---|---|---|---|---|")
    for planning in (True, False):
        hp = dataclasses.replace(base, order_planning=planning)
        blocks = [edit_from_fresh_model(hp, requests[i:i + args.block])
                  for i in range(0, args.edits, args.block)]
        whole = [edit_from_fresh_model(hp, requests)]
        for t, runs in ((args.block, blocks), (args.edits, whole)):
            secs, steps = sum(r[0] for r in runs), sum(r[1] for r in runs)
            print(f"| {'on' if planning else 'off'} | {t} | {len(runs)} | {secs:.2f} | "
                  f"{secs / args.edits:.5f} | {steps} | {steps / args.edits:.3f} |")


if __name__ == "__main__":
    main()
