"""Can a query tell a paraphrase of an edit from another question about the same subject?

The subject router (``router: subject``) sends every position after an edited subject to
that subject's expert, so "the same subject asked something else" (the same-subject probe,
``lemoe_easyedit.evaluation.probes``) reaches the expert as a paraphrase does. The locality
guard can keep it out only if the query at the asking position lies nearer the edit's
anchors for a paraphrase than for another question. This script edits held-out records with
``hparams/LEMoE/realfact-llama.yaml`` for each ``query_pool``, then scores, for every edit,
the cosine of the last position's query to the nearest anchor of the edit's expert (what the
guard compares with its threshold), for the paraphrase (positive) and for the same-subject
probe (negative): ROC AUC and the share of paraphrases above the 95th percentile of the
probes.

    python examples/realfact_guard_separation.py [--out examples/results]

Writes ``realfact-guard-separation.md`` there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

POOLS = ("ffn_input", "prefix_mean", "token")


def separation(requests: List[dict], pool: str) -> Dict[str, float]:
    """Edit ``requests`` with the realfact YAML and ``query_pool=pool``; score the guard's
    cosine for paraphrases against same-subject probes."""
    from sklearn.metrics import roc_auc_score

    from realfact_tune import yaml_hparams

    from lemoe_easyedit import realfact
    from lemoe_easyedit.editing import apply_lemoe_to_model
    from lemoe_easyedit.injection import find_adaptor
    from lemoe_easyedit.training import collate, edit_queries, encode_edits

    hp = yaml_hparams("LEMoE")
    hp.query_pool = pool
    model, tok = realfact.load_realfact(Path(hp.model_name))
    edits = [dict(r, target_new=r["target_new"] + tok.eos_token) for r in requests]
    model, _ = apply_lemoe_to_model(model, tok, edits, hp)
    layer = find_adaptor(model)

    def nearest(prompt: str, target: str, slot) -> torch.Tensor:
        """Cosine to the slot's nearest anchor at the positions that predict ``target``
        after ``prompt`` (the first: the asking position)."""
        e = encode_edits(tok, [{"prompt": prompt, "target_new": target}], hp.max_length)[0]
        batch = collate([e], tok.pad_token_id, "cpu")
        q = torch.nn.functional.normalize(edit_queries(model, layer, batch)[0].float(), dim=-1)
        anchors = torch.nn.functional.normalize(slot.anchors.float(), dim=-1)
        return (q[e.prompt_len - 1:len(e.input_ids) - 1] @ anchors.t()).amax(1)

    pos, neg, answer_min = [], [], []
    by_prompt = {r["prompt"]: r for r in edits}
    with torch.no_grad():
        for slot in layer.slots:  # one expert an edit
            r = by_prompt[slot.edits[0]["prompt"]]
            sims = nearest(r["rephrase_prompt"], r["target_new"], slot)
            pos.append(float(sims[0]))
            answer_min.append(float(sims.min()))
            probe = r["locality"].get("same_subject")
            if probe:
                neg.append(float(nearest(probe["prompt"], probe["ground_truth"], slot)[0]))
    pos_t, neg_t = torch.tensor(pos), torch.tensor(neg)
    cut = torch.quantile(neg_t, 0.95)
    at = hp.guard_threshold
    return {"auc": roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg),
            "asking_admitted": float((pos_t >= at).float().mean()),
            "answer_admitted": float((torch.tensor(answer_min) >= at).float().mean()),
            "probes_admitted": float((neg_t >= at).float().mean()), "threshold": at,
            "admitted": float((pos_t > cut).float().mean()), "cut": float(cut),
            "pos_median": float(pos_t.median()), "neg_median": float(neg_t.median()),
            "n_pos": len(pos), "n_neg": len(neg)}


def main(argv=None) -> int:
    import realfact_tune

    from lemoe_easyedit.evaluation.probes import with_same_subject_probes

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "examples" / "results"))
    p.add_argument("--n", type=int, default=250, help="CounterFact background records")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets = {"CounterFact background": realfact_tune.heldout_requests(args.n),
            "zsRE tail": realfact_tune.tail_requests("zsre")}
    lines = ["# Paraphrase against the same subject asked something else, by query",
             "", "`python examples/realfact_guard_separation.py`: held-out records (never "
             "reported) edited with `hparams/LEMoE/realfact-llama.yaml`, one expert an edit, "
             "for each `query_pool`; per edit, the cosine of the last position's query to the "
             "nearest anchor of the edit's expert (what the guard compares with "
             "`guard_threshold`) for its paraphrase and for its same-subject probe. "
             "'admitted': paraphrases above the 95th percentile of the probes. At the YAML's "
             "`guard_threshold` (t): the share of paraphrases admitted at the asking position, "
             "at every position of the (teacher-forced) answer, and of probes admitted at the "
             "asking position.", "",
             "| records | query_pool | AUC | admitted at 5% of probes | cut | median paraphrase "
             "| median probe | t | paraphrase asking >= t | whole answer >= t | probe >= t | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, requests in sets.items():
        requests, _ = with_same_subject_probes(requests)
        for pool in POOLS:
            s = separation(requests, pool)
            lines.append(f"| {name} | {pool} | {s['auc']:.3f} | {s['admitted']:.3f} | "
                         f"{s['cut']:.3f} | {s['pos_median']:.3f} | {s['neg_median']:.3f} | "
                         f"{s['threshold']} | {s['asking_admitted']:.3f} | "
                         f"{s['answer_admitted']:.3f} | {s['probes_admitted']:.3f} | "
                         f"{s['n_pos']} / {s['n_neg']} |")
            print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "realfact-guard-separation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
