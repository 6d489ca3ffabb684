"""Tune each method's ``hparams/<METHOD>/realfact-llama.yaml`` on held-out records.

The realfact model (``lemoe_easyedit.realfact``) was pretrained on the edit records of the
shared CounterFact and zsRE files *and* on background CounterFact records
(``counterfact-train.json``, the first ``DEFAULT_BACKGROUND``), which no reported number
edits. This script edits those background records: it keeps the ones the model knows
(prompt, paraphrase and locality prompt answered exactly), takes the first ``--n`` (after
``--skip``), and runs every configuration of a small grid per method under the same
lifelong protocol as the reported numbers (all edits applied, then every edit scored;
edit targets end with ``</s>`` as the model's facts do). The configuration with the best
mean whole-object exact match (Rel, Gen, Loc; ties: token average, then edit time) is the
one to keep in the YAML.

    python examples/realfact_tune.py --methods LEMoE GRACE FT --n 200
    python examples/realfact_tune.py --methods ROME MEMIT --n 50

Writes ``--out/<METHOD>.md`` and ``.json`` (default ``examples/sweeps``, files
``realfact-<METHOD>.*``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: method -> {hparams field: values}; the product is swept. Small on purpose (CPU minutes).
GRIDS: Dict[str, Dict[str, list]] = {
    "LEMoE": {"layer": [2, 3], "lr": [1e-2, 3e-3], "query_pool": ["prefix_mean", "ffn_input"]},
    "GRACE": {"inner_params": [["model.layers[2].mlp.down_proj.weight"],
                               ["model.layers[3].mlp.down_proj.weight"]],
              "eps": [4.0, 16.0, 64.0]},
    "FT": {"layers": [[2], [3]], "lr": [5e-4, 5e-3]},
    "ROME": {"layers": [[0], [1]], "v_lr": [0.5]},
    "MEMIT": {"layers": [[0, 1], [0, 1, 2]], "mom2_update_weight": [10, 1000]},
}


def heldout_requests(n: int, skip: int = 0, model_dir=None) -> List[dict]:
    """The first ``n`` known background records (after ``skip``), as EasyEdit requests."""
    from lemoe_easyedit import realfact
    from lemoe_easyedit.evaluation.data import load_counterfact

    path = Path(model_dir) if model_dir else realfact.realfact_model_path()
    info = realfact.build_info(path)
    bg = [s for s in info["sources"] if s["role"] == "background"]
    if not bg:
        raise SystemExit(f"{path} was built without background records: nothing held out")
    data_dir = realfact.default_data_dir()
    src = Path(bg[0]["path"])
    if not src.is_file():
        if data_dir is None:
            raise SystemExit("the background file is not here: set LEMOE_DATA_DIR")
        src = data_dir / "counterfact" / src.name
    kept = _known(path, load_counterfact(src)[:bg[0]["records"]], "background records")
    kept = kept[skip:skip + n]
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} known held-out records after --skip {skip}")
    return kept


def tail_requests(data: str = "zsre", reported: int = 900, model_dir=None) -> List[dict]:
    """The known edit records of ``data``'s shared file ("zsre" or "counterfact") after the
    first ``reported`` known ones, which a reported T=900 run edits: held-out records
    from the reported records' own file."""
    from lemoe_easyedit import realfact
    from lemoe_easyedit.evaluation.data import load_counterfact, load_zsre

    data_dir = realfact.default_data_dir()
    if data_dir is None:
        raise SystemExit(f"the {data} file is not here: set LEMOE_DATA_DIR")
    if data == "zsre":
        requests = load_zsre(data_dir / "zsre" / "zsre_mend_train-1k.json",
                             skip_malformed=True)
    else:
        requests = load_counterfact(data_dir / "counterfact" / "counterfact-edit-1k.json")
    path = Path(model_dir) if model_dir else realfact.realfact_model_path()
    return _known(path, requests, f"{data} edit records")[reported:]


def _known(path: Path, requests: List[dict], what: str) -> List[dict]:
    """The ``requests`` the model at ``path`` knows (every probe answered exactly)."""
    from lemoe_easyedit import realfact

    model, tok = realfact.load_realfact(path)
    kept, dropped = realfact.known_requests(model, tok, requests)
    print(f"held-out: {len(kept)} of {len(requests)} {what} known ({len(dropped)} dropped)",
          file=sys.stderr)
    return kept


def yaml_hparams(method: str):
    """``hparams/<method>/realfact-llama.yaml`` loaded, its relative paths resolved."""
    from lemoe_easyedit.evaluation import load_hparams
    from lemoe_easyedit.hparams_files import resolve_relative

    yaml_path = REPO / "hparams" / method / "realfact-llama.yaml"
    hp = load_hparams(method, str(yaml_path))
    hp.model_name = resolve_relative(hp.model_name, yaml_path)
    if hasattr(hp, "mom2_dataset"):
        hp.mom2_dataset = resolve_relative(hp.mom2_dataset, yaml_path)
    if hasattr(hp, "stats_dir"):
        hp.stats_dir = str(Path(hp.stats_dir).expanduser())
    return hp


def main(argv=None) -> int:
    """Sweep the grids; print and write one table per method."""
    from lemoe_easyedit.evaluation import run_protocol

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(GRIDS))
    p.add_argument("--n", type=int, default=200, help="held-out edits per configuration")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "examples" / "sweeps"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None,
                   help='JSON {field: [values]} replacing the grid of the (single) method')
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--heldout", default="background",
                   choices=("background", "zsre-tail", "counterfact-tail"),
                   help="background: CounterFact background records (--n, --skip); "
                        "zsre-tail / counterfact-tail: the file's known edit records after "
                        "the 900 a report edits")
    p.add_argument("--no-same-subject-probes", action="store_true",
                   help="leave out the same-subject locality probe (on by default: Loc-EM is "
                        "then the mean of the file's locality probe and this one)")
    args = p.parse_args(argv)
    if args.grid:
        if len(args.methods) != 1:
            raise SystemExit("--grid needs exactly one method")
        GRIDS[args.methods[0]] = json.loads(args.grid)
    torch.set_num_threads(args.threads)
    requests = (heldout_requests(args.n, args.skip) if args.heldout == "background"
                else tail_requests(args.heldout.split("-")[0]))
    if not args.no_same_subject_probes:
        from lemoe_easyedit.evaluation.probes import with_same_subject_probes

        requests, _ = with_same_subject_probes(requests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        base = yaml_hparams(method)
        grid = GRIDS[method]
        rows = []
        for values in itertools.product(*grid.values()):
            hp = copy.deepcopy(base)
            setting = dict(zip(grid, values))
            for k, v in setting.items():
                setattr(hp, k, v)
            t0 = time.time()
            res = run_protocol(method, hp, requests, progress=False, quiet=True,
                               edit_end_token=True)
            s = res["summary"]
            em = [s.get(k) for k in ("rel_em", "gen_em", "loc_em")]
            row = {"setting": setting, "rel": s.get("rel"), "gen": s.get("gen"),
                   "loc": s.get("loc"), "rel_em": em[0], "gen_em": em[1], "loc_em": em[2],
                   "loc_own": _own_locality(s), "loc_same": s.get("loc_em:same_subject"),
                   "rel_wild": s.get("rel_wild"), "gen_wild": s.get("gen_wild"),
                   "avg_em": sum(x or 0 for x in em) / 3, "avg": s.get("avg"),
                   "edit_s": res["timings"].get("edit_s"), "wall_s": time.time() - t0}
            rows.append(row)
            print(method, json.dumps(row), flush=True)
        rows.sort(key=lambda r: (-r["avg_em"], -(r["avg"] or 0), r["edit_s"] or 0))
        which = (f"the first {args.n} known background records (counterfact-train.json)"
                 if args.heldout == "background" else
                 f"the {len(requests)} known {args.heldout.split('-')[0]} edit records after "
                 "the first 900 (never in a reported T=900 run)")
        lines = [f"# {method} on held-out realfact records", "",
                 f"`python examples/realfact_tune.py --methods {method}"
                 f"{f' --n {args.n}' if args.heldout == 'background' else ''}"
                 f"{f' --skip {args.skip}' if args.skip else ''}"
                 f"{f' --heldout {args.heldout}' if args.heldout != 'background' else ''}`: "
                 f"{which}, "
                 "all edited, then all scored; "
                 "EM = whole-object greedy exact match; wild = the object and then `</s>`; "
                 "Loc-EM is the mean of the file's locality probe (neighbourhood or NQ, "
                 "column 'file') and the same-subject probe (column 'same', "
                 "`lemoe_easyedit.evaluation.probes`) when it is there.",
                 "", "| setting | Rel-EM | Gen-EM | Loc-EM | file | same | avg EM | Rel | Gen | "
                 "Loc | Rel-wild | Gen-wild | edit s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def f(x):
            return "" if x is None else f"{x:.3f}"

        for r in rows:
            setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
            lines.append(f"| {setting} | {f(r['rel_em'])} | {f(r['gen_em'])} | "
                         f"{f(r['loc_em'])} | {f(r['loc_own'])} | {f(r['loc_same'])} | "
                         f"{f(r['avg_em'])} | {f(r['rel'])} | "
                         f"{f(r['gen'])} | {f(r['loc'])} | {f(r['rel_wild'])} | "
                         f"{f(r['gen_wild'])} | {f(r['edit_s'])} |")
        name = f"realfact-{method}{args.tag}"
        if args.grid:
            lines[2] = lines[2].replace(f"--methods {method}",
                                        f"--methods {method} --grid '{args.grid}'")
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        print("\n".join(lines))
    return 0


def _own_locality(summary: dict):
    """Loc-EM of the file's own locality probe (the kind that is not same-subject)."""
    from lemoe_easyedit.evaluation import locality_kinds
    from lemoe_easyedit.evaluation.probes import SAME_SUBJECT

    kinds = [k for k in locality_kinds([summary]) if k != SAME_SUBJECT]
    return summary.get(f"loc_em:{kinds[0]}") if len(kinds) == 1 else summary.get("loc_em")


if __name__ == "__main__":
    sys.exit(main())
