"""The lifelong protocol: edit calls, restoring between chunks, EasyEdit's metrics, greedy EM."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import UNRELATED, fact_requests
from lemoe_easyedit import easyedit, evaluation as ev
from lemoe_easyedit.easyedit import registry


@dataclass
class FakeHParams:
    model_name: str
    alg_name: str = "FAKE_NOOP"
    device: int = 0
    max_length: int = 40
    batch_size: int = 1
    model_parallel: bool = False


CALLS = []


def fake_noop(model, tok, requests, hparams, copy=False, return_orig_weights=False,
              keep_original_weight=False, **kwargs):
    """Changes nothing; records what it was given."""
    CALLS.append([r["prompt"] for r in requests])
    return model, {}


def fake_break(model, tok, requests, hparams, **kwargs):
    """Scrambles the output head: every prediction changes."""
    CALLS.append(model.lm_head.weight[0, 0].item())
    with torch.no_grad():
        torch.manual_seed(len(CALLS))
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    return model, {}


@pytest.fixture(scope="module", autouse=True)
def fake_methods():
    from easyeditor.util.alg_dict import ALG_DICT

    easyedit.register_method("FAKE_NOOP", fake_noop)
    easyedit.register_method("FAKE_BREAK", fake_break)
    yield
    for name in ("FAKE_NOOP", "FAKE_BREAK"):
        ALG_DICT.pop(name, None)
        registry._EXTRA_BATCHABLE.discard(name)


@pytest.fixture()
def llama(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return path, model, AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------- edit calls


def test_edit_calls_sequential_batch_and_checkpoints():
    assert ev.edit_calls(3, "sequential", 1) == [(0, 1), (1, 2), (2, 3)]
    assert ev.edit_calls(10, "batch", 4) == [(0, 4), (4, 8), (8, 10)]
    assert ev.edit_calls(10, "batch", 1000) == [(0, 10)]
    # A checkpoint at k edits needs a model that has seen exactly k edits.
    assert ev.edit_calls(10, "batch", 1000, checkpoint_every=4) == [(0, 4), (4, 8), (8, 10)]
    assert ev.edit_calls(10, "batch", 3, checkpoint_every=5) == [(0, 3), (3, 5), (5, 8),
                                                                 (8, 10)]


def test_edit_mode_per_method():
    hp = FakeHParams("m")
    assert ev.edit_mode("FAKE_NOOP", hp) == ("sequential", 1)
    hp.batch_size = 8
    assert ev.edit_mode("FAKE_NOOP", hp) == ("batch", 8)   # registered methods are batchable
    hp.alg_name, hp.batch_size = "ROME", 8
    assert ev.edit_mode("ROME", hp) == ("sequential", 1)   # EasyEdit: ROME is not batchable
    assert ev.edit_mode("MEMIT", FakeHParams("m", "MEMIT", batch_size=5)) == ("batch", 5)
    assert ev.edit_mode("MEMIT", FakeHParams("m", "MEMIT", batch_size=1)) == ("sequential", 1)
    assert ev.edit_mode("LEMoE", FakeHParams("m", "LEMoE", batch_size=1000)) == ("batch", 1000)
    with pytest.raises(ValueError, match="not registered"):
        ev.edit_mode("NO_SUCH_METHOD", hp)


# ----------------------------------------------------------------------- protocol


def test_noop_scores_agree_with_easyedit_and_are_consistent(llama):
    from easyeditor.evaluate import compute_edit_quality

    path, model, tok = llama
    reqs = fact_requests(6)
    reqs[1] = dict(reqs[1], target_new="Paris London Rome")   # multi-token target
    del reqs[2]["rephrase_prompt"]
    CALLS.clear()
    res = ev.run_protocol("FAKE_NOOP", FakeHParams(str(path)), reqs, model=model, tok=tok,
                          checkpoint_every=3, progress=False)
    assert len(CALLS) == 6 and all(len(c) == 1 for c in CALLS)
    per = res["per_edit"]
    assert [m["index"] for m in per] == list(range(6))
    for m, r in zip(per, reqs):
        q = compute_edit_quality(model, str(path), FakeHParams(str(path)), tok, r, 0)
        assert m["rel"] == pytest.approx(float(np.mean(q["rewrite_acc"])))
        assert m["loc"] == 1.0 and m["loc_em"] == 1.0           # nothing changed
        # Teacher-forced token accuracy 1 <=> greedy reproduces the whole target.
        assert (m["rel"] == 1.0) == (m["rel_em"] == 1.0)
        for key in ("rel", "rel_em", "loc", "loc_em"):
            assert 0.0 <= m[key] <= 1.0
    assert per[2]["gen"] is None and per[2]["gen_em"] is None
    assert res["summary"]["gen"] == pytest.approx(np.mean([m["gen"] for m in per if m["gen"]
                                                           is not None]))
    assert [c["edits"] for c in res["checkpoints"]] == [3, 6]
    assert res["checkpoints"][0]["n"] == 3 and res["checkpoints"][1]["n"] == 6
    json.dumps(res)  # JSON-serialisable as it is
    assert set(res["versions"]) >= {"torch", "transformers", "easyeditor", "lemoe_easyedit"}
    assert res["seed"] == 0 and res["hparams"]["model_name"] == str(path)
    assert res["timings"]["edit_s"] >= 0 and res["timings"]["eval_s"] > 0
    assert res["protocol"]["edit_mode"] == "sequential"
    assert res["edit_order"]["stream"] == [r.get("case_id", i) for i, r in enumerate(reqs)]


def test_locality_compares_with_the_unedited_model_and_chunks_restore(llama):
    path, model, tok = llama
    base_weight = model.lm_head.weight[0, 0].item()
    reqs = fact_requests(8)
    CALLS.clear()
    res = ev.run_protocol("FAKE_BREAK", FakeHParams(str(path), "FAKE_BREAK"), reqs,
                          model=model, tok=tok, chunk_size=4, progress=False)
    # Every chunk starts from the unedited model: the first call of each chunk sees it.
    assert CALLS[0] == pytest.approx(base_weight) and CALLS[4] == pytest.approx(base_weight)
    assert CALLS[1] != pytest.approx(base_weight)
    assert model.lm_head.weight[0, 0].item() == base_weight       # caller's model untouched
    assert res["protocol"]["n_chunks"] == 2 and len(res["chunks"]) == 2
    assert res["summary"]["loc"] < 0.9 and res["summary"]["loc_em"] < 0.9
    s0, s1 = (c["summary"] for c in res["chunks"])
    assert res["summary"]["loc"] == pytest.approx((s0["loc"] + s1["loc"]) / 2)
    assert [m["chunk"] for m in res["per_edit"]] == [0] * 4 + [1] * 4


def test_batch_method_calls_and_errors(llama):
    path, model, tok = llama
    hp = FakeHParams(str(path), batch_size=3)
    CALLS.clear()
    res = ev.run_protocol("FAKE_NOOP", hp, fact_requests(6), model=model, tok=tok,
                          greedy=False, progress=False)
    assert [len(c) for c in CALLS] == [3, 3]
    assert res["protocol"]["edit_calls"] == [[0, 3], [3, 6]]
    assert "rel_em" not in res["per_edit"][0] or res["per_edit"][0]["rel_em"] is None
    with pytest.raises(ValueError, match="multiple of the chunk"):
        ev.run_protocol("FAKE_NOOP", hp, fact_requests(5), model=model, tok=tok, chunk_size=2)
    with pytest.raises(ValueError, match="eval_metric"):
        ev.run_protocol("FAKE_NOOP", hp, fact_requests(2), model=model, tok=tok,
                        eval_metric="bleu")


def test_ppl_metric_for_hallucination_style_data(llama):
    path, model, tok = llama
    reqs = [{"prompt": f"This is a passage about {n}.", "target_new": "Paris is sunny",
             "ground_truth": "<|endoftext|>", "subject": n,
             "locality": {"locality": {"prompt": UNRELATED[i], "ground_truth": "sunny"}}}
            for i, n in enumerate(["Alice Smith", "Bob Jones"])]
    res = ev.run_protocol("FAKE_NOOP", FakeHParams(str(path)), reqs, model=model, tok=tok,
                          eval_metric="ppl", progress=False)
    for m in res["per_edit"]:
        assert m["rel_ppl"] > 1.0 and m["gen_ppl"] is None and m["loc"] == 1.0
        assert "rel" not in m
    assert res["summary"]["rel_ppl"] > 1.0
    assert "PPL" in res["scoring"]
    assert "rel_ppl" in ev.summary_table([res])


def test_greedy_generate_matches_transformers_generate(llama):
    _, model, tok = llama
    prompts = [UNRELATED[0], "Alice Smith was born in the city of", "The birthplace of"]
    ours = ev.greedy_generate(model, tok, prompts, [4, 2, 3], batch_size=2)
    for p, n, got in zip(prompts, [4, 2, 3], ours):
        x = tok([p], return_tensors="pt")
        out = model.generate(**x, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert out[0, x["input_ids"].shape[1]:].tolist() == got


def test_grace_under_the_protocol(llama):
    """A real method through its registered EasyEdit function, two chunks."""
    from lemoe_easyedit.grace import GraceHyperParams

    path, model, tok = llama
    hp = GraceHyperParams(model_name=str(path), eps=1e-3, n_iter=30,
                          inner_params=["model.layers[3].mlp.down_proj.weight"])
    res = ev.run_protocol("GRACE", hp, fact_requests(8), model=model, tok=tok, chunk_size=4,
                          progress=False)
    assert res["implementation"].startswith("lemoe_easyedit")
    assert [c["method_state"]["grace_keys"] for c in res["chunks"]] == [4, 4]
    assert res["summary"]["rel"] == 1.0 and res["summary"]["loc"] == 1.0
    assert res["protocol"]["restore"] == "copy"
    # Loaded by the protocol and reloaded from disk for every chunk (big models).
    res = ev.run_protocol("GRACE", hp, fact_requests(6), chunk_size=2, restore="reload",
                          progress=False)
    assert res["protocol"]["restore"] == "reload"
    assert [c["method_state"]["grace_keys"] for c in res["chunks"]] == [2, 2, 2]
