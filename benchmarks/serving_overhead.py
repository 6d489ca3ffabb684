"""Serving overhead of a LEMoE-edited model: the testbed beside a realistic-width LLaMA.

The edited model's forward against the unedited one's, on the same prompts, timed back to
back in alternating order (best of ``--repeats``: on a shared machine the minimum is what
the code costs). One prompt per forward, as the bench's latency rows; half the prompts are
edited (their positions reach an expert), half are not.

* **testbed**: the embedded 0.8M-parameter LLaMA (hidden 64), edited for real with the
  testbed YAML (1000 counterfactual edits cut into 5 or 100 experts);
* **realistic**: a random-weight LLaMA of realistic width (``--hidden`` 2048, full FFN width
  ``--ffn`` 5632, ``--layers`` 4, vocabulary of the local tokenizer), the adaptor at the
  middle layer with FFN experts of ``--expert-width`` (the 7B YAMLs' 1024) whose anchors are
  the edited prompts' own FFN inputs (so their positions route as a trained adaptor's
  would); three routing setups: the testbed's (FFN-input query, nearest anchor, guard), the
  paper 7B YAMLs' (embedding prefix mean, learned keys, no guard: every position goes to
  some expert) and the realfact YAML's subject router (an edited prompt's positions from its
  subject on go to the expert of that subject).

Prints one table (figures in ms and the ratio edited / base per setup) and writes it as
JSON with ``--out``. One torch thread (``--threads``)::

    python benchmarks/serving_overhead.py                # about 3 minutes on 1 CPU thread
    python benchmarks/serving_overhead.py --quick        # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor
from lemoe_easyedit.injection import inject_adaptor
from lemoe_bench.measure import unedited  # benchmarks/ is this script's folder


def time_forwards(model, inputs: Sequence[dict], repeats: int) -> Dict[str, float]:
    """Sum over ``inputs`` of each one's best forward time, edited and base, in seconds;
    with the share of positions routed to an expert and the distinct experts per forward
    (what the experts' own cost grows with)."""
    best = {True: [float("inf")] * len(inputs), False: [float("inf")] * len(inputs)}
    layer = find_adaptor(model)
    routed = positions = experts = 0
    with torch.no_grad():
        for x in inputs:
            model(**x, use_cache=False)
            e = layer.last_routes.expert if layer.last_routes is not None else None
            positions += x["input_ids"].numel()
            if e is not None:
                routed += int((e >= 0).sum())
                experts += len(set(e[e >= 0].tolist()))
        for rep in range(repeats + 1):  # round 0 warms up
            for j, x in enumerate(inputs):
                for edited in ((True, False) if (rep + j) % 2 else (False, True)):
                    with (contextlib.nullcontext() if edited else unedited(model)):
                        t0 = time.perf_counter()
                        model(**x, use_cache=False)
                        dt = time.perf_counter() - t0
                    if rep:
                        best[edited][j] = min(best[edited][j], dt)
    return {"base_s": sum(best[False]), "edited_s": sum(best[True]),
            "routed": routed / positions, "experts_per_forward": experts / len(inputs)}


def testbed_rows(experts: List[int], n_prompts: int, repeats: int, n_edits: int) -> List[Dict]:
    from lemoe_easyedit.testbed import load_edit_set, load_testbed, testbed_model_path

    path = testbed_model_path()
    base, tok, _ = load_testbed(path)
    base.eval()
    requests = load_edit_set(f"counterfact-{n_edits}")[:n_edits]
    rows = []
    for n in experts:
        import copy

        model = copy.deepcopy(base)
        hp = LEMoEHyperParams.from_hparams("testbed-llama")
        hp = dataclasses.replace(hp, model_name=str(path),
                                 edits_per_expert=-(-n_edits // n), max_experts=None)
        apply_lemoe_to_model(model, tok, requests, hp)
        assert len(find_adaptor(model).slots) == n, len(find_adaptor(model).slots)
        edited = [r["prompt"] for r in requests[: n_prompts // 2]]
        other = [next(iter(r["locality"].values()))["prompt"]
                 for r in requests[-(n_prompts - len(edited)):]]
        inputs = [tok(p, return_tensors="pt") for p in edited + other]
        rows.append({"model": "testbed (hidden 64, 4 layers)", "setup": "testbed YAML",
                     "experts": n, **time_forwards(model, inputs, repeats)})
    return rows


def realistic_model(hidden: int, ffn: int, layers: int, prompts: Sequence[str]):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lemoe_easyedit.testing import build_tokenizer

    tok = build_tokenizer(list(prompts) * 4, vocab_size=512)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=0, pad_token_id=1,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    return model, tok


def realistic_rows(experts: List[int], n_prompts: int, repeats: int, hidden: int, ffn: int,
                   layers: int, width: int) -> List[Dict]:
    edited = [f"The mother tongue of person number {i} in the registry is" for i in
              range(n_prompts // 2)]
    other = [f"A weather report for district {i} says that tomorrow will be" for i in
             range(n_prompts - len(edited))]
    model, tok = realistic_model(hidden, ffn, layers, edited + other)
    inputs = [tok(p, return_tensors="pt") for p in edited + other]
    setups = {
        "FFN-input query, nearest anchor, guard (testbed YAML)":
            dict(query_pool="ffn_input", router="anchor", locality_guard=True,
                 guard_threshold=0.7),
        "prefix mean, learned keys, no guard (7B YAMLs)":
            dict(query_pool="prefix_mean", router="learned", locality_guard=False),
        "subject router, no guard (realfact YAML)":
            dict(query_pool="ffn_input", router="subject", locality_guard=False),
    }
    rows = []
    base_hp = LEMoEHyperParams.from_hparams("llama-7b")
    for label, routing in setups.items():
        for n in experts:
            hp = dataclasses.replace(base_hp, model_name="realistic", layer=layers // 2,
                                     expert_width=width, negatives_per_edit=0, **routing)
            layer = inject_adaptor(model, hp)
            # The edited prompts' own queries at their last token: a trained adaptor's
            # anchors are the queries of the positions that predict the targets.
            seen = {}
            hook = layer.register_forward_pre_hook(
                lambda m, a: seen.__setitem__("x", a[0].detach()))
            queries = []
            with torch.no_grad():
                for x in inputs[: len(edited)]:
                    model(**x, use_cache=False)
                    q, _ = layer.queries.current(seen["x"])
                    queries.append(q[0, -1])
            hook.remove()
            gen = torch.Generator().manual_seed(1)
            for i in range(n):
                slot = layer.new_slot(seed=i)
                slot.anchors = F.normalize(queries[i % len(queries)].reshape(1, -1), dim=-1)
                # A learned key starts at its anchors' centroid (the YAMLs' key_init), so an
                # edited prompt reaches its own expert as after training.
                slot.routing.init_key_at_centroid(slot.anchors)
                if hp.router == "subject":  # the subject of expert i: "person number i"
                    slot.edits = [{"prompt": edited[i % len(edited)],
                                   "subject": f"person number {i % len(edited)}"}]
                    slot.store_subjects(tok, torch.zeros(1, dtype=torch.long))
                with torch.no_grad():
                    w = slot.expert.w_out.weight
                    w.copy_(torch.randn(w.shape, generator=gen).to(w.dtype) * 1e-3)
                slot.freeze()
            timing = time_forwards(model, inputs, repeats)
            rows.append({"model": f"random LLaMA (hidden {hidden}, FFN {ffn}, {layers} layers, "
                                  f"expert width {width})",
                         "setup": label, "experts": n, **timing})
            from lemoe_easyedit.injection import remove_adaptor
            remove_adaptor(model)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", default="5,100", help="comma-separated expert counts")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--testbed-repeats", type=int, default=40)
    p.add_argument("--edits", type=int, default=1000, help="testbed edits")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-testbed", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    experts = [int(e) for e in args.experts.split(",")]
    if args.quick:
        args.repeats, args.testbed_repeats, args.prompts = 2, 3, 4
        args.hidden, args.ffn, args.expert_width, args.edits = 256, 704, 128, 200
    rows: List[Dict] = []
    t0 = time.time()
    if not args.skip_testbed:
        rows += testbed_rows(experts, args.prompts, args.testbed_repeats, args.edits)
    rows += realistic_rows(experts, args.prompts, args.repeats, args.hidden, args.ffn,
                           args.layers, args.expert_width)
    print("| model | routing | experts | positions routed | experts per forward | "
          "base ms / prompt | edited ms / prompt | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["edited_s"] / r["base_s"]
        k = args.prompts
        print(f"| {r['model']} | {r['setup']} | {r['experts']} | {r['routed']:.0%} | "
              f"{r['experts_per_forward']:.1f} | {1e3 * r['base_s'] / k:.3f} | "
              f"{1e3 * r['edited_s'] / k:.3f} | {r['ratio']:.3f} |")
    print(f"\n{args.prompts} prompts, one per forward, best of {args.repeats} (realistic) / "
          f"{args.testbed_repeats} (testbed); torch {torch.__version__}, "
          f"{args.threads} thread(s); {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
