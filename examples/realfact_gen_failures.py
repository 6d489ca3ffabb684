"""Why does a paraphrase of a realfact edit fail? One class per Gen-EM failure.

Edits a slice of known records (zsRE or CounterFact) with ``hparams/LEMoE/realfact-llama.yaml``
(plus ``--set`` overrides), then, for every edit whose paraphrase does not greedily give the
whole new object, follows the paraphrase and the new object through the edited model
(teacher-forced) and names what went wrong:

* ``unrouted: subject not in paraphrase`` / ``unrouted: guard``: no answer position reached
  an expert (the paraphrase does not name the subject as the edit does / it does: the
  guard, or a spelling of the subject that no stored token form matches);
* ``asking position not admitted``: the guard kept the position that asks for the object
  from the expert, a later one reached it;
* ``answer leaves the expert midway``: the answer began at the edit's expert and later
  positions reached none (with ``guard_carries``: the answer names another edited subject,
  "Belarus" in "Belarusian First League", which starts a run of its own);
* ``wrong expert``: an answer position reached another edit's expert;
* ``expert's answer wrong``: every answer position reached the edit's expert, and the
  expert still did not give the object.

    python examples/realfact_gen_failures.py --data zsre --n 150
    python examples/realfact_gen_failures.py --data zsre --n 150 --set prompt_variants=0
    python examples/realfact_gen_failures.py --data zsre --start 900 --n 200   # held out

Prints the counts and one JSON line per failure (``--out`` writes them to a file too).
Records are the known ones (``realfact.known_requests``) in file order; ``--start 900``
on zsRE gives the records no reported T=900 run edits.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

FILES = {"zsre": ("zsre", "zsre_mend_train-1k.json"),
         "counterfact": ("counterfact", "counterfact-edit-1k.json")}


def _value(text: str):
    """``--set`` value: JSON where it parses (numbers, true/false, null), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def failures(data: str, start: int, n: int, overrides: Dict) -> tuple:
    """``(counts, rows)``: the class of every Gen-EM failure among ``n`` known records of
    ``data`` from ``start``, and what each failure generated and how it was routed."""
    import copy
    import dataclasses

    from realfact_tune import yaml_hparams

    from lemoe_easyedit import realfact
    from lemoe_easyedit.editing import apply_lemoe_to_model
    from lemoe_easyedit.evaluation.data import load_counterfact, load_zsre
    from lemoe_easyedit.evaluation.scoring import greedy_generate, target_token_ids
    from lemoe_easyedit.injection import find_adaptor
    from lemoe_easyedit.training import collate, encode_edits

    hp = dataclasses.replace(yaml_hparams("LEMoE"), **overrides)  # validated again
    model, tok = realfact.load_realfact(Path(hp.model_name))
    data_dir = realfact.default_data_dir()
    if data_dir is None:
        raise SystemExit("the shared data files are not here: set LEMOE_DATA_DIR")
    folder, name = FILES[data]
    path = data_dir / folder / name
    records = load_zsre(path, skip_malformed=True) if data == "zsre" else load_counterfact(path)
    known, _ = realfact.known_requests(model, tok, records)
    chosen = known[start:start + n]
    eos = tok.eos_token
    edits = [dict(r, target_new=r["target_new"] + eos) for r in chosen]
    unedited = copy.deepcopy(model)
    model, _ = apply_lemoe_to_model(model, tok, edits, hp)
    layer = find_adaptor(model)
    slot_of = {s.edits[0]["prompt"]: i for i, s in enumerate(layer.slots)}

    def answer_routes(prompt: str, target: str) -> List[int]:
        e = encode_edits(tok, [{"prompt": prompt, "target_new": target}], hp.max_length)[0]
        batch = collate([e], tok.pad_token_id, "cpu")
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return layer.last_routes.expert[0, e.prompt_len - 1:len(e.input_ids) - 1, 0].tolist()

    # Gen-EM exactly as the runner scores it: the object's tokens, greedily, after the
    # paraphrase (one more token is generated: the end token, shown in "generated").
    objects = [r["target_new"][:-len(eos)] for r in edits]
    paraphrases = [r["rephrase_prompt"] for r in edits]
    wanted = [target_token_ids(tok, p, o)[1] for p, o in zip(paraphrases, objects)]
    steps = [len(w) + 1 for w in wanted]
    generated = greedy_generate(model, tok, paraphrases, steps)
    counts: collections.Counter = collections.Counter()
    failed = []
    for r, obj, want, got in zip(edits, objects, wanted, generated):
        if got[:len(want)] == want:
            counts["ok"] += 1
            continue
        own = slot_of[r["prompt"]]
        routes = answer_routes(r["rephrase_prompt"], r["target_new"])
        if all(x == -1 for x in routes):
            kind = ("unrouted: subject not in paraphrase"
                    if r["subject"] not in r["rephrase_prompt"] else "unrouted: guard")
        elif any(x not in (own, -1) for x in routes):
            kind = "wrong expert"
        elif routes[0] == -1:
            kind = "asking position not admitted"
        elif -1 in routes:
            kind = "answer leaves the expert midway"
        else:
            kind = "expert's answer wrong"
        counts[kind] += 1
        failed.append((r, obj, got, kind, routes, own))
    before = greedy_generate(unedited, tok, [r["rephrase_prompt"] for r, *_ in failed],
                             [len(got) for _, _, got, *_ in failed])
    rows = [{"kind": kind, "prompt": r["prompt"], "paraphrase": r["rephrase_prompt"],
             "subject": r["subject"], "object": obj, "generated": tok.decode(got),
             "unedited": tok.decode(pre), "answer_routes": routes, "expert": own}
            for (r, obj, got, kind, routes, own), pre in zip(failed, before)]
    return counts, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=sorted(FILES), default="zsre")
    p.add_argument("--start", type=int, default=0, help="first known record")
    p.add_argument("--n", type=int, default=150, help="records edited (one stream)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field (repeatable)")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    torch.set_num_threads(1)
    counts, rows = failures(args.data, args.start, args.n, overrides)
    total = sum(counts.values())
    lines = [f"{args.data} known records {args.start}..{args.start + total - 1}, "
             f"overrides {overrides or 'none'}: Gen-EM {counts['ok'] / total:.3f}"]
    lines += [f"  {kind}: {c}" for kind, c in counts.most_common()]
    lines += [json.dumps(row, ensure_ascii=False) for row in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
