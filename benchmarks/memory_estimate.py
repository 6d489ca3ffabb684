"""GPU memory a paper-model YAML needs, estimated from what the code allocates.

No 7B model runs here, so the figures are computed, term by term, from the tensors LEMoE
creates (sizes from each model's public config; 16-bit activations as the YAMLs'
``torch_dtype``):

* **weights**: the base model in ``torch_dtype``;
* **experts**: ``max_experts`` FFN experts of ``expert_width`` (host dtype), each with a
  float32 routing projection and key, and the float32 anchors of ``T`` edits
  (``--target-tokens`` per edit, one anchor per target token);
* **training** (one expert at a time): float32 master copy, gradient and the two AdamW
  moments of the expert (``float32_masters``);
* **cached activations**: the hidden state leaving the adapted block for every minibatch of
  the expert's ``edits_per_expert`` edits (``train_batch_size`` x ``max_length`` x hidden),
  captured once (``activation_cache.UpperStack.capture``);
* **blocks above the adaptor**: what autograd keeps for one step's backward through the
  ``layers - layer - 1`` upper blocks, ``tokens x (34 hidden + 5 heads x max_length)``
  bytes per block in 16 bits (Korthikanti et al. 2022, no recomputation), plus the logits at
  the target positions only;
* **query buffers**: order planning's queries of a 256-edit chunk
  (``training.prompt_queries``): the float32 embedding prefix sums (two ``[256, L, hidden]``
  tensors) and the widest transient of a block's forward (its FFN's ``[256 x L, FFN]``
  gate and up activations); the anchors' queries of one expert's edits (``[epe, L, hidden]``
  float32).

The peak is the weights plus the experts plus the largest of the editing terms (they are
not alive together: queries are computed before an expert trains). EasyEdit's own scoring
forwards (full logits over the vocabulary) come on top and are not counted::

    python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import argparse
import math

import yaml

from lemoe_easyedit.hparams import HPARAMS_DIR

#: Public config facts: layers, hidden, FFN width, attention heads, vocabulary, parameters.
MODELS = {
    "llama-7b": ("LLaMA-2-7B", 32, 4096, 11008, 32, 32000, 6.74e9, True),
    "mistral-7b": ("Mistral-7B", 32, 4096, 14336, 32, 32000, 7.24e9, True),
    "qwen2.5-7b": ("Qwen2.5-7B", 28, 3584, 18944, 28, 152064, 7.62e9, True),
    "gpt-j-6b": ("GPT-J-6B", 28, 4096, 16384, 16, 50400, 6.05e9, False),
    "gpt2-xl": ("GPT-2 XL", 48, 1600, 6400, 25, 50257, 1.56e9, False),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, None: 4}
GPUS = [(24, "24 GB (RTX 4090, A10)"), (40, "40 GB (A100-40GB)"), (48, "48 GB (L40S, A6000)"),
        (80, "80 GB (A100/H100-80GB)")]
GB = 1e9


def estimate(name: str, edits: int, target_tokens: int, dtype: str | None = "yaml") -> dict:
    """The terms of one YAML's estimate, in bytes; ``dtype`` overrides its torch_dtype."""
    with open(HPARAMS_DIR / f"{name}.yaml") as f:
        hp = yaml.safe_load(f)
    if dtype != "yaml":
        hp["torch_dtype"] = dtype
    title, layers, hidden, ffn, heads, vocab, params, gated = MODELS[name]
    b = BYTES[hp.get("torch_dtype")]
    L, epe, tbs = hp["max_length"], hp["edits_per_expert"], hp["train_batch_size"]
    width = hp.get("expert_width") or ffn
    dim = hp["router_dim"]
    n_exp = hp.get("max_experts") or math.ceil(edits / epe)
    expert_params = (3 if gated else 2) * hidden * width + (0 if gated else width)
    routing = (hidden * dim + dim * dim + dim + 1) * 4
    anchors = edits * target_tokens * hidden * 4
    out = {"model": title, "yaml": name, "dtype": hp.get("torch_dtype") or "float32",
           "weights": params * b,
           "experts": n_exp * (expert_params * b + routing) + anchors}
    out["training"] = expert_params * 4 * (4 if b != 4 else 3)
    out["cached"] = math.ceil(epe / tbs) * tbs * L * hidden * b
    upper = layers - hp["layer"] - 1
    tokens = tbs * L
    act = upper * tokens * (34 * hidden + 5 * heads * L) * (b / 2)
    logits = tbs * target_tokens * vocab * 4 * 2   # target positions only, float32 + grad
    out["upper"] = act + logits
    chunk = min(256, edits)
    out["queries"] = max(2 * chunk * L * hidden * 4 + 2 * chunk * L * ffn * b,
                         epe * L * hidden * 4)
    out["editing"] = out["training"] + out["cached"] + out["upper"]
    out["peak"] = out["weights"] + out["experts"] + max(out["editing"], out["queries"])
    out["fits"] = next((label for gb, label in GPUS if out["peak"] * 1.1 <= gb * GB),
                       "more than 80 GB: model_parallel")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edits", type=int, default=1000, help="edits in the stream (T)")
    p.add_argument("--target-tokens", type=int, default=4,
                   help="target tokens per edit (one anchor each)")
    args = p.parse_args(argv)
    print("| YAML | model | dtype | weights | experts + anchors | training (masters, AdamW) "
          "| cached activations | blocks above (one step) | query buffers | peak | fits | "
          "peak in float32 | fits in float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        e = estimate(name, args.edits, args.target_tokens)
        e32 = estimate(name, args.edits, args.target_tokens, "float32")
        f = {k: f"{v / GB:.2f} GB" for k, v in e.items() if isinstance(v, float)
             or isinstance(v, int)}
        print(f"| `{name}` | {e['model']} | {e['dtype']} | {f['weights']} | {f['experts']} | "
              f"{f['training']} | {f['cached']} | {f['upper']} | {f['queries']} | "
              f"{f['peak']} | {e['fits']} | {e32['peak'] / GB:.2f} GB | {e32['fits']} |")
    print(f"\nT={args.edits} edits, {args.target_tokens} target tokens per edit; 10% headroom "
          f"for the allocator; EasyEdit's scoring forwards not included.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
