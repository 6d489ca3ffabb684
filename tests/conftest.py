"""Shared fixtures: tiny local models and a small fact set. No network, temp dirs only."""

import os
import random
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# The bench harness (benchmarks/lemoe_bench) is not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a loaded 2-core machine OpenMP
# spinning makes them many times slower.
torch.set_num_threads(1)

NAMES = ["Alice Smith", "Bob Jones", "Carl Brown", "Dana White", "Eve Black", "Fay Green",
         "Gus Hall", "Hal King", "Ivy Lane", "Jon Moss", "Kim Nash", "Lou Park", "Max Reed",
         "Ned Shaw", "Oli Todd", "Pam Vega", "Quin West", "Rae York", "Sal Zane", "Tom Abel"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lima", "Cairo",
          "Tokyo"]
UNRELATED = [f"The weather report for district {i} says it will be" for i in range(20)]


def fact_requests(n: int = 20, seed: int = 0):
    """``n`` EasyEdit requests "<name> was born in the city of" -> a city."""
    rng = random.Random(seed)
    reqs = []
    for i, name in enumerate(NAMES[:n]):
        reqs.append({
            "prompt": f"{name} was born in the city of",
            "target_new": rng.choice(CITIES),
            "ground_truth": "Nowhere",
            "subject": name,
            "rephrase_prompt": f"The birthplace of {name} is",
            "locality": {"neighborhood": {"prompt": UNRELATED[i % len(UNRELATED)],
                                          "ground_truth": "sunny"}},
            "portability": {},
        })
    return reqs


CORPUS = ([f"{r['prompt']} {r['target_new']}" for r in fact_requests()] + UNRELATED
          + [f"The birthplace of {n} is" for n in NAMES] + ["nq question: who wrote it? sunny"])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build each tiny family once per session; returns ``family -> path``."""
    from lemoe_easyedit.testing import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny_model(family, root, texts=CORPUS)
        return cache[family]

    return get


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in a temp dir (EasyEdit writes ./logs/run.log)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_model(path, **kwargs):
    """``(model in eval mode, tokenizer)`` of a local model; ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)


def rel(model, tok, requests, max_length: int = 40) -> float:
    """Teacher-forced accuracy of the requests' target tokens (EasyEdit's Rel)."""
    from lemoe_easyedit.training import collate, encode_edits

    b = collate(encode_edits(tok, requests, max_length), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    pred, lab = logits[:, :-1].argmax(-1), b.labels[:, 1:]
    m = lab != -100
    return ((pred == lab) & m).sum().item() / m.sum().item()
