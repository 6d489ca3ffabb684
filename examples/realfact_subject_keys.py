"""Would a subject-keyed routing query separate paraphrases from neighbours on real phrasings?

A measurement for the next step of the realfact issue, not a method: on the realfact model's
held-out background records (first 250 of counterfact-train.json, never reported), at the
adapted layer's FFN input, it compares two keys for an edit:

* ``last``: the FFN input at the edit prompt's last position (what LEMoE's ``ffn_input``
  query stores), matched against the probe's last position;
* ``subject``: the FFN input at the edit subject's last token, matched against the *best*
  position of the probe (a causal scan: any position up to the end may name the subject).

For each key it prints the cosine of the edit's key to its own paraphrase and to its
CounterFact neighbour (another subject, same relation and true object), and the share of
paraphrases a single threshold admits while admitting at most 5% / 1% of neighbours::

    python examples/realfact_subject_keys.py [--layer 3] [--n 250]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lemoe_easyedit.evaluation.data import load_counterfact  # noqa: E402
from lemoe_easyedit.realfact import realfact_model_path  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "counterfact",
                    "counterfact-train.json")


def ffn_inputs(model, tok, text: str, layer: int):
    """``(input ids' offsets, [T, hidden] FFN inputs)`` of ``text`` at ``layer``."""
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    seen = {}
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(input_ids=enc["input_ids"])
    finally:
        handle.remove()
    return enc["offset_mapping"][0].tolist(), torch.nn.functional.normalize(seen["x"][0], dim=-1)


def subject_position(offsets, prompt: str, subject: str):
    """Index of the token holding the subject's last character, or None."""
    at = prompt.find(subject)
    if at < 0:
        return None
    last = at + len(subject) - 1
    for i, (a, b) in enumerate(offsets):
        if a <= last < b:
            return i
    return None


def admitted(pos: np.ndarray, neg: np.ndarray, rate: float) -> float:
    """Share of ``pos`` above the threshold that admits ``rate`` of ``neg``."""
    threshold = np.quantile(neg, 1.0 - rate)
    return float((pos > threshold).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--n", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(1)
    path = realfact_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    requests = load_counterfact(DATA, skip_malformed=True)[:args.n]
    sims = {"last": ([], []), "subject": ([], [])}
    skipped = 0
    for r in requests:
        neighbour = (r.get("locality") or {}).get("neighborhood", {}).get("prompt")
        if not r.get("rephrase_prompt") or not neighbour:
            skipped += 1
            continue
        offsets, h = ffn_inputs(model, tok, r["prompt"], args.layer)
        s = subject_position(offsets, r["prompt"], r["subject"])
        if s is None:
            skipped += 1
            continue
        _, h_para = ffn_inputs(model, tok, r["rephrase_prompt"], args.layer)
        _, h_nb = ffn_inputs(model, tok, neighbour, args.layer)
        sims["last"][0].append(float(h[-1] @ h_para[-1]))
        sims["last"][1].append(float(h[-1] @ h_nb[-1]))
        sims["subject"][0].append(float((h_para @ h[s]).max()))
        sims["subject"][1].append(float((h_nb @ h[s]).max()))
    print(f"layer {args.layer}: {len(sims['last'][0])} edits ({skipped} skipped: no "
          "paraphrase, neighbour or subject span)")
    print("| key | cos to paraphrase (median) | cos to neighbour (median) | "
          "paraphrase > neighbour | paraphrases admitted at 5% / 1% neighbours |")
    print("|---|---|---|---|---|")
    for key, (pos, neg) in sims.items():
        pos, neg = np.array(pos), np.array(neg)
        print(f"| {key} | {np.median(pos):.3f} | {np.median(neg):.3f} | "
              f"{(pos > neg).mean():.3f} | {admitted(pos, neg, 0.05):.3f} / "
              f"{admitted(pos, neg, 0.01):.3f} |")


if __name__ == "__main__":
    main()
