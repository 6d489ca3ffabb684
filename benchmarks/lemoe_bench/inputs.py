"""What the bench runs on: the model, its edits, each method's hparams and corpus."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import List, Optional, Sequence

#: The checkout this harness runs from (``benchmarks/lemoe_bench`` -> the repository).
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
METHODS = ("LEMoE", "ROME", "MEMIT", "GRACE", "FT")
BASELINES = ("ROME", "MEMIT", "GRACE", "FT")
TESTBED_HPARAMS = "testbed-llama"


# ----------------------------------------------------------------------- set-up


def _testbed_path() -> Optional[Path]:
    try:
        from lemoe_easyedit import testbed
    except ImportError:
        return None
    shipped = getattr(testbed, "shipped_model_path", None)
    complete = getattr(testbed, "_complete", None)
    if shipped is None:
        return None
    path = shipped()
    if complete is not None and not complete(path):
        return None
    return path if path.is_dir() else None


def _synthetic_requests(n: int, seed: int) -> List[dict]:
    """``n`` edits "<name> lives in the city of" -> a city, with unrelated locality prompts."""
    rng = random.Random(seed)
    first = ["Ada", "Ben", "Cleo", "Dov", "Ena", "Fil", "Gia", "Hal", "Ivo", "Jun", "Kai",
             "Lia", "Mo", "Nia", "Oto", "Pia", "Rex", "Sia", "Teo", "Uma"]
    last = ["Arlo", "Brask", "Corr", "Dunn", "Elm", "Fane", "Grove", "Hask", "Irwin",
            "Joss", "Kemp", "Lorn", "Marsh", "Nell", "Orme", "Pike", "Quill", "Roan",
            "Sedge", "Tarn"]
    cities = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lima",
              "Cairo", "Tokyo", "Quito", "Dakar"]
    out = []
    for i in range(n):
        name = f"{first[i % 20]} {last[(i // 20) % 20]}" + (f" {i // 400}" if i >= 400 else "")
        out.append({
            "prompt": f"{name} lives in the city of", "target_new": rng.choice(cities),
            "ground_truth": "Nowhere", "subject": name,
            "rephrase_prompt": f"The home town of {name} is",
            "locality": {"neighborhood": {"prompt": f"The weather report {i} says it is",
                                          "ground_truth": "sunny"}},
            "portability": {},
        })
    return out


def _corpus_lines(requests: Sequence[dict]) -> List[str]:
    lines = []
    for r in requests:
        lines.append(f"{r['prompt']} {r['target_new']}.")
        for k, v in (r.get("locality") or {}).items():
            if isinstance(v, dict) and isinstance(v.get("prompt"), str):
                lines.append(f"{v['prompt']} {v.get('ground_truth', '')}.")
    return lines


def _lm_head_name(model) -> str:
    """Name under which ``named_parameters`` lists the LM head's weight (tied: the embedding)."""
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        if p is head:
            return name[: -len(".weight")]
    raise ValueError("the LM head's weight is not among the model's parameters")


def _generated_hparams(method: str, model_path: str, stats_dir: str, corpus: str) -> dict:
    """Hyper-parameters of ``method`` for any supported model, from the family table."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lemoe_easyedit.model_families import family_of

    config = AutoConfig.from_pretrained(model_path)
    with _meta_device():
        model = AutoModelForCausalLM.from_config(config)
    fam = family_of(model)
    n = getattr(config, fam.num_layers_key)
    mid = n // 2
    block = f"{fam.layers_path}.{{}}"
    templates = dict(
        rewrite_module_tmp=f"{block}.{fam.mlp_name}.{fam.out_proj}",
        layer_module_tmp=block, mlp_module_tmp=f"{block}.{fam.mlp_name}",
        attn_module_tmp=f"{block}.{fam.attn_name}", ln_f_module=fam.final_norm,
        lm_head_module=_lm_head_name(model))
    common = dict(alg_name=method, model_name=model_path, device=0, max_length=40,
                  model_parallel=False)
    rome_like = dict(fact_token="subject_last", v_num_grad_steps=20, v_lr=0.5,
                     v_loss_layer=n - 1, v_weight_decay=1e-3, clamp_norm_factor=4,
                     kl_factor=0.0625, mom2_adjustment=True, mom2_dataset=corpus,
                     mom2_n_samples=10000, mom2_dtype="float32", stats_dir=stats_dir)
    if method == "LEMoE":
        from lemoe_easyedit.hparams import HPARAMS_DIR
        import yaml

        cfg = yaml.safe_load((HPARAMS_DIR / "tiny-llama.yaml").read_text())
        cfg.update(model_name=model_path, layer=mid, edits_per_expert=25,
                   train_batch_size=25, batch_size=1000)
        return cfg
    if method == "ROME":
        return dict(common, layers=[max(0, mid - 1)], context_template_length_params=[[5, 10]],
                    **templates, **rome_like)
    if method == "MEMIT":
        return dict(common, layers=sorted({max(0, mid - 1), mid}), layer_selection="all",
                    mom2_update_weight=15000, batch_size=1, **templates, **rome_like)
    if method == "FT":
        t = dict(templates, rewrite_module_tmp=templates["rewrite_module_tmp"] + ".weight")
        return dict(common, layers=[mid], num_steps=25, batch_size=1, lr=5e-3,
                    weight_decay=0, kl_factor=0, norm_constraint=False, **t)
    if method == "GRACE":
        return dict(common, inner_params=[f"{fam.layers_path}[{n - 1}].{fam.mlp_name}."
                                          f"{fam.out_proj}.weight"],
                    edit_lr=1.0, n_iter=50, eps=1.0, dist_fn="euc", val_init="cold",
                    val_train="sgd", reg="early_stop", replacement="replace_last",
                    eps_expand="coverage", num_pert=8, dropout=0.0, batch_size=1)
    raise ValueError(f"no generated hparams for {method!r}")


@contextlib.contextmanager
def _meta_device():
    import torch

    with torch.device("meta"):
        yield


def _grace_available() -> bool:
    from lemoe_easyedit.evaluation.methods import _ensure_method

    try:
        _ensure_method("GRACE")
    except (ValueError, ImportError):
        return False
    return True


