"""LEMoE's locality settings on held-out testbed edits: the ablation table of the README.

Edits: ``--n`` edits drawn with edit seed ``--edit-seed`` (default 1) over the shipped testbed's
world, a different draw from the seed-0 edit sets the README reports on. Each configuration
(``negatives_per_edit``, ``radius_margin``, the global guard) edits them in one call from a
fresh model, then every edit is scored on the final model by whole-object exact match
(teacher-forced: every target token is the argmax, which is what greedy decoding of the
target's length produces): Rel (prompt), Gen (paraphrase), and each locality kind (the
unedited model gets every probe right, so exact match on the true object is "unchanged").

    python examples/sweep_locality.py                   # the README's ablation (T=1000)
    python examples/sweep_locality.py --n 200 --out results/sweep-locality.md
    python examples/sweep_locality.py --online --n 300  # one request per call (edit())
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model  # noqa: E402
from lemoe_easyedit.testbed import load_testbed, make_edit_set, score_pairs, to_requests  # noqa: E402
from lemoe_easyedit.testbed.editsets import LOCALITY_KINDS  # noqa: E402

PAPER = {"query_pool": "prefix_mean", "router": "learned", "locality_guard": False,
         "negatives_per_edit": 0}
#: (label, overrides of the testbed YAML).
CONFIGS = [
    ("one global guard (cos >= 0.7), no radii: the previous method", {"negatives_per_edit": 0}),
    ("global guard cos >= 0.85, no radii", {"negatives_per_edit": 0, "guard_threshold": 0.85}),
    ("global guard cos >= 0.9, no radii", {"negatives_per_edit": 0, "guard_threshold": 0.9}),
    ("radii: 1 swap per edit, margin 0.5", {"negatives_per_edit": 1, "radius_margin": 0.5}),
    ("radii: 2 swaps, margin 0.5", {"negatives_per_edit": 2, "radius_margin": 0.5}),
    ("radii: 4 swaps, margin 0.5", {"negatives_per_edit": 4, "radius_margin": 0.5}),
    ("radii: 1 swap, margin 0.25", {"negatives_per_edit": 1, "radius_margin": 0.25}),
    ("radii: 2 swaps, margin 0.25", {"negatives_per_edit": 2, "radius_margin": 0.25}),
    ("radii: 4 swaps, margin 0.25", {"negatives_per_edit": 4, "radius_margin": 0.25}),
    ("radii: 2 swaps, margin 0.35, no global floor (guard_threshold -1)",
     {"guard_threshold": -1.0}),
    ("radii: 2 swaps, margin 0.35 (the testbed YAML)", {}),
    # The paper's routing (the 7B YAMLs): embedding prefix-mean queries, learned keys.
    ("paper routing: prefix mean, learned keys, no guard", PAPER),
    ("paper routing + radii (guard on, no floor)",
     {**PAPER, "locality_guard": True, "guard_threshold": -1.0, "negatives_per_edit": 2}),
    ("FFN-input query, learned keys + radii (guard on, no floor)",
     {"router": "learned", "guard_threshold": -1.0}),
    # The subject router (README, "Real benchmark facts"): the subject's tokens choose the
    # edits a position may reach, the anchors (and the guard, if on) the one among them.
    ("subject router, no guard", {"router": "subject", "locality_guard": False}),
    ("subject router + global guard 0.7, no radii",
     {"router": "subject", "negatives_per_edit": 0}),
    ("subject router + radii: 2 swaps, margin 0.35 (the YAML's guard)", {"router": "subject"}),
]


def exact(model, tok, pairs) -> float:
    return sum(s[1] for s in score_pairs(model, tok, pairs)) / max(1, len(pairs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="edits (T)")
    p.add_argument("--edit-seed", type=int, default=1)
    p.add_argument("--hparams", default=str(REPO / "hparams/LEMoE/testbed-llama.yaml"))
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--only", default=None,
                   help="run only the configurations whose label contains this text")
    p.add_argument("--online", action="store_true",
                   help="one request per call (EasyEdit's edit()), the YAML with and "
                        "without radii, instead of the batch ablation")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok, world = load_testbed()
    requests = to_requests(make_edit_set(world, args.n, seed=args.edit_seed, model=model,
                                         tokenizer=tok))
    base = LEMoEHyperParams.from_hparams(args.hparams)
    rows = []
    configs = CONFIGS if not args.online else [
        ("online, the testbed YAML", {}),
        ("online, no radii", {"negatives_per_edit": 0})]
    if args.only:
        configs = [c for c in configs if args.only in c[0]]
    for label, overrides in configs:
        hp = copy.copy(base)
        for k, v in overrides.items():
            setattr(hp, k, v)
        hp.__post_init__()
        t0 = time.time()
        if args.online:
            edited = copy.deepcopy(model)
            for r in copy.deepcopy(requests):
                edited, _ = apply_lemoe_to_model(edited, tok, [r], hp)
        else:
            edited, _ = apply_lemoe_to_model(copy.deepcopy(model), tok, copy.deepcopy(requests),
                                             hp)
        edit_s = time.time() - t0
        row = {"config": label, "overrides": overrides, "edit_s": edit_s,
               "rel": exact(edited, tok, [(r["prompt"], r["target_new"]) for r in requests]),
               "gen": exact(edited, tok, [(r["rephrase_prompt"], r["target_new"])
                                          for r in requests])}
        for kind in LOCALITY_KINDS:
            row[kind] = exact(edited, tok, [(r["locality"][kind]["prompt"],
                                             r["locality"][kind]["ground_truth"])
                                            for r in requests if kind in r["locality"]])
        loc = sum(row[k] for k in LOCALITY_KINDS) / len(LOCALITY_KINDS)
        row["avg"] = (row["rel"] + row["gen"] + loc) / 3
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = ["configuration", "Rel", "Gen"] + [f"Loc {k.replace('_', ' ')}"
                                              for k in LOCALITY_KINDS] + ["Avg", "edit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"]] + [f"{r[k]:.3f}" for k in ["rel", "gen", *LOCALITY_KINDS, "avg"]]
        lines.append("| " + " | ".join(cells + [f"{r['edit_s']:.1f}"]) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            f"# LEMoE locality {'online' if args.online else 'ablation'} (held-out: edit seed "
            f"{args.edit_seed}, T={args.n})\n\n"
            f"Whole-object exact match. Command: `python examples/sweep_locality.py --n "
            f"{args.n} --edit-seed {args.edit_seed}{' --online' if args.online else ''}"
            f"{f' --only {chr(39)}{args.only}{chr(39)}' if args.only else ''}`"
            f"\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
