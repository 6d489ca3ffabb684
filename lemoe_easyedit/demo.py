"""``lemoe-easyedit demo``: the main job.

Loads the embedded fact-world testbed (a small LLaMA that knows its facts), applies a stream
of counterfactual edits with LEMoE in one lifelong run, and shows what changed: Rel / Gen /
Loc before and after on EasyEdit's teacher-forced token metric and as whole-target greedy
exact match, a few prompts answered before and after, a results JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List

import torch

DEFAULT_HPARAMS = "testbed-llama"
METRICS = ("rel", "gen", "loc", "rel_em", "gen_em", "loc_em")
LABELS = {"rel": "Rel (token)", "gen": "Gen (token)", "loc": "Loc (token)",
          "rel_em": "Rel (exact)", "gen_em": "Gen (exact)", "loc_em": "Loc (exact)"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the demo; all optional."""
    parser.add_argument("--num-edits", type=int, default=200,
                        help="edits applied in one lifelong run (default 200)")
    parser.add_argument("--hparams", default=DEFAULT_HPARAMS,
                        help="LEMoE YAML (path or name in hparams/LEMoE; default testbed-llama)")
    parser.add_argument("--out", default="results/demo", help="output directory")
    parser.add_argument("--examples", type=int, default=3,
                        help="edits shown with their answers before and after")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for this small model)")
    return parser


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; returns the exit code."""
    from . import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor
    from .evaluation.scoring import score_requests, target_token_ids
    from .testbed import load_edit_set, load_testbed, testbed_model_path

    if args.num_edits < 1:
        raise SystemExit("--num-edits must be at least 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_path = testbed_model_path()
    model, tok, _ = load_testbed(model_path)
    model.eval()
    hp = LEMoEHyperParams.from_hparams(args.hparams)
    hp = dataclasses.replace(hp, model_name=str(model_path))
    requests = load_edit_set(f"counterfact-{max(args.num_edits, 1)}")[:args.num_edits]
    print(f"testbed: {model_path.name}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters; {len(requests)} edits; LEMoE layer {hp.layer}, "
          f"{hp.edits_per_expert} edits per expert, router {hp.router}")

    before = score_requests(model, tok, hp, requests)
    edited = copy.deepcopy(model)
    t_edit = time.time()
    apply_lemoe_to_model(edited, tok, requests, hp)
    edit_s = time.time() - t_edit
    edited.eval()
    after = score_requests(edited, tok, hp, requests, unedited=model)
    layer = find_adaptor(edited)

    print()
    print(_table(before["summary"], after["summary"]))
    print(f"\n{len(layer.slots)} experts, editing took {edit_s:.1f} s "
          f"({len(requests) / edit_s:.1f} edits/s)")
    shown = _examples(model, edited, tok, requests[:args.examples], target_token_ids)
    for ex in shown:
        print(f"\n  edit      {ex['edit']!r} -> {ex['target_new']!r}")
        for kind, probe in ex.items():
            if isinstance(probe, dict):
                print(f"  {kind:13s} {probe['text']!r}: {probe['before']!r} -> "
                      f"{probe['after']!r}")

    results = {
        "method": "LEMoE", "num_edits": len(requests), "model": str(model_path),
        "hparams": hp.to_dict(), "before": before["summary"], "after": after["summary"],
        "per_edit_after": after["per_edit"], "examples": shown,
        "experts": len(layer.slots), "edit_plan": getattr(layer, "plans", []),
        "timings": {"edit_s": edit_s, "total_s": time.time() - t0},
        "scoring": "rel/gen/loc: EasyEdit compute_edit_quality (teacher-forced token "
                   "accuracy; loc = unchanged argmax tokens); *_em: whole-target greedy "
                   "exact match",
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _plot(before["summary"], after["summary"], out / "before_after.png", len(requests))
    print(f"\nwrote {out / 'results.json'} and {out / 'before_after.png'} "
          f"in {time.time() - t0:.0f} s")
    return 0


def _rows(summary: Dict) -> List[str]:
    """The metrics shown: Rel, Gen, Loc (mean over kinds) and Loc of each probe kind."""
    from .evaluation.scoring import locality_kinds

    kinds = locality_kinds([summary])
    rows = []
    for k in METRICS:
        rows.append(k)
        if k in ("loc", "loc_em") and len(kinds) > 1:
            rows.extend(f"{k}:{kind}" for kind in kinds)
    return rows


def _label(key: str) -> str:
    if ":" not in key:
        return LABELS[key]
    metric, kind = key.split(":", 1)
    return f"{LABELS[metric]}, {kind.replace('_', ' ')}"


def _table(before: Dict, after: Dict) -> str:
    lines = ["| metric | before | after |", "|---|---|---|"]
    for k in _rows(after):
        b, a = before.get(k), after.get(k)
        lines.append(f"| {_label(k)} | {_fmt(b)} | {_fmt(a)} |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _examples(base, edited, tok, requests: List[dict], target_token_ids) -> List[dict]:
    from .evaluation.scoring import greedy_generate

    shown = []
    for r in requests:
        probes = {"prompt": (r["prompt"], r["target_new"]),
                  "rephrase": (r.get("rephrase_prompt") or r["prompt"], r["target_new"])}
        for kind, loc in (r.get("locality") or {}).items():
            probes[kind] = (loc["prompt"], loc["ground_truth"])
        ex = {"edit": r["prompt"], "target_new": r["target_new"]}
        for kind, (text, answer) in probes.items():
            n = len(target_token_ids(tok, text, answer)[1])
            pair = [tok.decode(greedy_generate(m, tok, [text], [n])[0],
                               skip_special_tokens=True).strip() for m in (base, edited)]
            ex[kind] = {"text": text, "before": pair[0], "after": pair[1]}
        shown.append(ex)
    return shown


def _plot(before: Dict, after: Dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in _rows(after) if before.get(k) is not None or after.get(k) is not None]
    xs = range(len(keys))
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(keys)), 4.2))
    ax.bar([x - 0.2 for x in xs], [before.get(k) or 0 for k in keys], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [after.get(k) or 0 for k in keys], 0.4, label="after")
    ax.set_xticks(list(xs), [_label(k) for k in keys], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"LEMoE on the fact-world testbed, {n} lifelong edits")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
