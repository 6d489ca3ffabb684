"""The comparison on a testbed built from a second world seed (defaults chosen on seed 0).

Builds (once, about 10 minutes on a 2-core CPU; cached under ``$LEMOE_TESTBED_CACHE`` or
``~/.cache/lemoe_easyedit/testbed``) the testbed model of world seed ``--world-seed``, draws
its edit sets with their three locality kinds exactly as the shipped sets are drawn, and
runs ``runner compare`` on them with the same YAML files as the seed-0 tables (model path
overridden with ``--model``)::

    python examples/second_world.py                              # seed 1, T=1000 and 3000
    python examples/second_world.py --T 1000 --methods LEMoE GRACE FT ROME MEMIT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lemoe_easyedit.evaluation import runner  # noqa: E402
from lemoe_easyedit.testbed import (load_testbed, make_edit_set, testbed_model_path,  # noqa: E402
                                    to_requests)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-seed", type=int, default=1)
    p.add_argument("--T", type=int, nargs="+", default=[1000, 3000])
    p.add_argument("--methods", nargs="+", default=["LEMoE", "GRACE", "FT"])
    p.add_argument("--out", default="results/second-world")
    args = p.parse_args()
    torch.set_num_threads(1)
    model_path = testbed_model_path(seed=args.world_seed)
    model, tok, world = load_testbed(model_path)
    out = Path(args.out) / f"world{args.world_seed}"
    out.mkdir(parents=True, exist_ok=True)
    # One set of the largest T; a smaller T takes its first edits, as --num-edits does on
    # the shipped default set.
    edits = out / f"counterfact-{max(args.T)}.json"
    if not edits.is_file():
        requests = to_requests(make_edit_set(world, max(args.T), seed=0, model=model,
                                             tokenizer=tok))
        edits.write_text(json.dumps(requests, indent=0))
    del model
    for T in sorted(args.T):
        runner.main(["compare", "--methods", *args.methods, "--hparams-dir",
                     str(REPO / "hparams"), "--hparams-name", "testbed-llama",
                     "--data", "testbed", "--data-path", str(edits), "--model",
                     str(model_path), "--num-edits", str(T), "--chunk", str(T),
                     "--seed", "0", "--threads", "1", "--no-progress",
                     "--out", str(out / f"T{T}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
