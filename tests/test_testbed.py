"""The embedded testbed: world, tokenizer, pretrained tiny LLaMA, edit sets, metrics.

No network: everything is built here or shipped in ``lemoe_easyedit/testbed_assets``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import random
import time
from pathlib import Path

import pytest
import torch

from lemoe_easyedit.testbed import (ASSET_NAME, EDIT_TEMPLATES, REPHRASE_TEMPLATES, World,
                                    counterfact_records, editor_inputs, fact_accuracy,
                                    greedy_complete, load_testbed, load_world,
                                    make_edit_cases, make_edit_set, score_pairs,
                                    shipped_model_path, template_accuracy,
                                    testbed_model_path, to_requests, zsre_records)
from lemoe_easyedit.testbed.build import TrainSpec, build_testbed, main as build_main
from lemoe_easyedit.testbed.model import ModelSpec
from lemoe_easyedit.testbed.tokenizer import build_tokenizer, check_concatenation

SMALL_WORLD = dict(n_entities=40, n_relations=4, n_objects=12, n_landmarks=20,
                   n_landmark_relations=2, n_landmark_objects=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped():
    return load_testbed(shipped_model_path())


@pytest.fixture(scope="module")
def reduced_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "seed3" / ASSET_NAME
    t0 = time.time()
    result = build_testbed(out, seed=3, world_kwargs=SMALL_WORLD,
                           model_spec=ModelSpec(hidden_size=64, num_hidden_layers=4,
                                                intermediate_size=256),
                           train_spec=TrainSpec(epochs=10), progress=False)
    return result, time.time() - t0


# --------------------------------------------------------------------------- world
def test_world_is_deterministic_and_large_enough():
    a, b = World.generate(seed=0), World.generate(seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert a.to_dict() == b.to_dict()
    assert World.generate(seed=1).fingerprint() != a.fingerprint()
    assert len(a.entities) >= 300 and len(set(a.entities)) == len(a.entities)
    assert len(a.relations) >= 10
    assert len(a.facts) >= 3000
    assert len({(f.subject, f.relation) for f in a.facts}) == len(a.facts)
    assert all(len(e.split()) >= 2 for e in a.entities)  # multi-token names
    for rel in a.relations:
        assert len(rel.templates) >= 6
        assert len(set(rel.objects)) == len(rel.objects) >= 2
        heads = [o.split()[0] for o in rel.objects]
        assert len(set(heads)) == len(heads)  # counterfactuals differ on the first token
        for t in rel.templates:
            assert "{s}" in t and not t.endswith(" ") and not t.endswith("{s}")
    # locality facts are about other subjects and other relations
    assert a.locality_facts
    assert not set(a.landmarks) & set(a.entities)
    assert not {r.name for r in a.landmark_relations} & {r.name for r in a.relations}
    for e in a.entities[:50]:
        assert all(e not in l for l in a.landmarks)


def test_world_api_and_training_text():
    w = World.generate(seed=5, n_entities=30, n_relations=10)
    assert len(w.facts) == 300
    f = w.facts[0]
    p = w.prompt(f, 3)
    assert f.subject in p and p == w.relation(f.relation).templates[3].format(s=f.subject)
    text = w.training_text()
    assert len(text) == len(w.facts) * 6 + len(w.locality_facts) * 3
    assert set(text) >= {w.prompt(x, t) + " " + x.object for x in w.facts for t in range(6)}
    assert World.from_dict(json.loads(json.dumps(w.to_dict()))).fingerprint() == w.fingerprint()
    assert w.lookup(f.subject, f.relation) == f


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_matches_easyedit_concatenation(tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    w = World.generate(seed=2, n_entities=30, n_relations=4)
    tok = build_tokenizer(w.training_text())
    assert tok.vocab_size == len(tok) and tok.padding_side == "right"
    assert tok.pad_token is not None and tok.eos_token is not None
    pairs = w.training_examples()
    assert check_concatenation(tok, pairs) == len(pairs)
    # every world word is one token
    assert len(tok(pairs[0][0] + " " + pairs[0][1])["input_ids"]) == \
        1 + len((pairs[0][0] + " " + pairs[0][1]).split())
    path = tmp_path / "tiny-llama-tok"
    tok.save_pretrained(path)
    texts = [p + " " + o for p, o in pairs[::7]] + ["Unseen wörds, 42!"]
    for cls in (LlamaTokenizer, AutoTokenizer):  # LlamaTokenizer: what EasyEdit uses
        again = cls.from_pretrained(str(path))
        assert len(again) == len(tok)
        assert [again(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
        check_concatenation(again, pairs[::11])


# --------------------------------------------------------------------------- build
def test_reduced_build_learns_its_facts(reduced_build):
    result, seconds = reduced_build
    acc = result.info["accuracy"]
    # Measured on a quiet 2-core CPU: ~15 s, and 1.0 / 1.0 for seeds 0, 1, 3, 7.
    assert seconds < 120, seconds
    assert acc["min_token"] >= 0.9 and acc["min_exact"] >= 0.8, acc["per_template"]
    assert min(v["exact"] for v in acc["locality_per_template"].values()) >= 0.8
    for name in ("config.json", "model.safetensors", "tokenizer.json", "build_info.json",
                 "world.json"):
        assert (result.path / name).is_file()
    info = json.loads((result.path / "build_info.json").read_text())
    assert info["seed"] == 3 and info["training"]["steps"] > 0
    assert info["model"]["vocab_size"] == len(result.tokenizer)


def test_reduced_build_loads_like_a_checkpoint(reduced_build):
    result, _ = reduced_build
    model, tok, world = load_testbed(result.path)
    assert world.fingerprint() == result.world.fingerprint()
    assert model.config.vocab_size == len(tok)
    fresh = template_accuracy(model, tok, world)
    for t, v in result.info["accuracy"]["per_template"].items():
        assert fresh[int(t)]["token"] == pytest.approx(v["token"], abs=1e-3)
    # the cache lookup finds it without rebuilding
    cache = result.path.parent.parent
    assert testbed_model_path(seed=3, cache_dir=cache, build_if_missing=False) == result.path
    with pytest.raises(FileNotFoundError):
        testbed_model_path(seed=4, cache_dir=cache, build_if_missing=False)


def test_build_is_deterministic(tmp_path):
    kwargs = dict(seed=11, world_kwargs=dict(SMALL_WORLD, n_entities=10),
                  model_spec=ModelSpec(hidden_size=32, num_hidden_layers=2, intermediate_size=64),
                  train_spec=TrainSpec(epochs=1, batch_size=16), progress=False,
                  evaluate=False, save=False)
    a = build_testbed(tmp_path / "a-llama", **kwargs)
    b = build_testbed(tmp_path / "b-llama", **kwargs)
    assert a.world.fingerprint() == b.world.fingerprint()
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_cli(tmp_path):
    out = tmp_path / "tiny-llama-cli"
    assert build_main(["--out", str(out), "--seed", "1", "--entities", "6", "--relations", "2",
                       "--objects", "4", "--landmarks", "4", "--epochs", "1", "--hidden", "32",
                       "--layers", "1", "--intermediate", "64", "--no-progress"]) == 0
    info = json.loads((out / "build_info.json").read_text())
    assert info["command"].startswith("python -m lemoe_easyedit.testbed.build")
    assert info["world"]["summary"]["facts"] == 12
    assert set(info["accuracy"]["per_template"]) == {str(t) for t in range(6)}


# --------------------------------------------------------------------------- shipped model
def test_shipped_assets_are_complete_and_small():
    path = shipped_model_path()
    assert "llama" in path.name
    assert testbed_model_path() == path
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 10 * 2**20, size
    info = json.loads((path / "build_info.json").read_text())
    for key in ("seed", "command", "world", "training", "accuracy", "build_time_s", "model"):
        assert key in info
    assert info["training"]["steps"] > 0
    assert info["world"]["summary"]["facts"] >= 3000
    per = info["accuracy"]["per_template"]
    assert len(per) >= 6
    assert all(v["token"] >= 0.95 and v["exact"] >= 0.85 for v in per.values())
    assert info["build_time_s"] < 15 * 60


def test_shipped_model_knows_the_shipped_world(shipped):
    model, tok, world = shipped
    assert world.fingerprint() == World.generate(**world.params).fingerprint()
    assert model.config.vocab_size == len(tok)
    sample = random.Random(0).sample(world.facts, 300)
    acc = template_accuracy(model, tok, world, facts=sample)
    assert len(acc) == world.n_templates
    for t, v in acc.items():
        assert v["token"] >= 0.95 and v["exact"] >= 0.85, (t, v)
    loc = template_accuracy(model, tok, world, facts=world.locality_facts)
    assert all(v["exact"] >= 0.85 for v in loc.values()), loc
    # teacher-forced exact match == real greedy decoding
    f = sample[0]
    assert greedy_complete(model, tok, [world.prompt(f, 4)], max_new_tokens=6) == [f.object]


def test_shipped_model_under_easyedit_tokenizer_setup(shipped):
    """BaseEditor loads the tokenizer with LlamaTokenizer, pad = eos, left padding, and
    scores ``prompt + ' ' + target`` batched (``test_prediction_acc``); same answers."""
    from transformers import LlamaTokenizer

    model, _, world = shipped
    tok = LlamaTokenizer.from_pretrained(str(shipped_model_path()))
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "left"
    facts = random.Random(1).sample(world.facts, 32)
    prompts = [world.prompt(f, i % 6) for i, f in enumerate(facts)]
    targets = [f.object for f in facts]
    full = tok([p + " " + t for p, t in zip(prompts, targets)], padding=True,
               return_tensors="pt")
    prompt_tok = tok(prompts, padding=True, return_tensors="pt")
    n_prompt = [int((i != tok.pad_token_id).sum()) for i in prompt_tok["input_ids"]]
    n_pad = [int((i == tok.pad_token_id).sum()) for i in full["input_ids"]]
    with torch.no_grad():
        answers = model(**full).logits.argmax(-1).tolist()
    labels = full["input_ids"].tolist()
    for row, lab, a, b in zip(answers, labels, n_pad, n_prompt):
        start = a + b
        assert row[start - 1:-1] == lab[start:]


# --------------------------------------------------------------------------- edit sets
def test_edit_sets_are_deterministic():
    w = World.generate(seed=0)
    a = make_edit_set(w, 3000, style="counterfact", seed=0)
    assert a == make_edit_set(w, 3000, style="counterfact", seed=0)
    assert a != make_edit_set(w, 3000, style="counterfact", seed=1)
    assert make_edit_set(w, 50, style="zsre", seed=2) == make_edit_set(w, 50, style="zsre", seed=2)
    with pytest.raises(ValueError):
        make_edit_set(w, len(w.facts) + 1)


def test_edit_set_fields_and_templates():
    w = World.generate(seed=0)
    cases = make_edit_cases(w, 3000, seed=0)
    assert len({(c.subject, c.relation) for c in cases}) == 3000
    for c in cases:
        rel = w.relation(c.relation)
        assert c.subject in c.prompt and c.subject in c.rephrase_prompt
        assert c.prompt_template in EDIT_TEMPLATES and c.rephrase_template in REPHRASE_TEMPLATES
        assert c.prompt == rel.templates[c.prompt_template].format(s=c.subject)
        assert c.rephrase_prompt == rel.templates[c.rephrase_template].format(s=c.subject)
        assert c.ground_truth == w.lookup(c.subject, c.relation).object
        assert c.target_new in rel.objects and c.target_new != c.ground_truth
        assert c.locality_subject in w.landmarks
        assert w.lookup(c.locality_subject, c.locality_relation).object == c.locality_ground_truth
    zs = zsre_records(cases[:20])
    for r in zs:
        assert {"src", "rephrase", "alt", "answers", "loc", "loc_ans", "subject"} <= set(r)
        assert r["subject"] in r["src"]
    cf = counterfact_records(cases[:20])
    for r in cf:
        assert {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                "locality_prompt", "locality_ground_truth"} <= set(r)
    for records in (zs, cf, cases[:20]):
        reqs = to_requests(records)
        assert len(reqs) == 20
        for req, c in zip(reqs, cases):
            assert set(req) == {"prompt", "target_new", "ground_truth", "rephrase_prompt",
                                "subject", "locality", "portability"}
            assert req["portability"] == {}
            assert req["prompt"] == c.prompt and req["target_new"] == c.target_new
            assert req["locality"]["landmark"] == {"prompt": c.locality_prompt,
                                                   "ground_truth": c.locality_ground_truth}
            assert req["locality"]["same_relation"] == {
                "prompt": c.same_relation_prompt, "ground_truth": c.same_relation_ground_truth}
            if c.same_subject_prompt is not None:
                assert req["locality"]["same_subject"] == {
                    "prompt": c.same_subject_prompt,
                    "ground_truth": c.same_subject_ground_truth}
    kw = editor_inputs(cf)
    assert all(len(kw[k]) == 20 for k in ("prompts", "target_new", "ground_truth",
                                          "rephrase_prompts", "subject"))
    assert len(kw["locality_inputs"]["landmark"]["prompt"]) == 20
    assert len(kw["locality_inputs"]["same_relation"]["prompt"]) == 20


def test_edit_set_against_the_shipped_model(shipped):
    model, tok, world = shipped
    cases = make_edit_cases(world, 400, seed=0, model=model, tokenizer=tok)
    assert cases == make_edit_cases(world, 400, seed=0, model=model, tokenizer=tok)
    edit = score_pairs(model, tok, [(c.prompt, c.target_new) for c in cases])
    rephrase = score_pairs(model, tok, [(c.rephrase_prompt, c.target_new) for c in cases])
    truth = score_pairs(model, tok, [(c.prompt, c.ground_truth) for c in cases])
    for e, r in zip(edit, rephrase):
        assert not e[1] and not r[1]  # the counterfactual is not what the model says
    # first target token differs from the model's own first token
    for c, g in zip(cases, truth):
        first_target = tok(c.prompt + " " + c.target_new)["input_ids"][len(tok(c.prompt)["input_ids"])]
        assert first_target != g[2][0]
    assert greedy_complete(model, tok, [cases[0].prompt])[0] != cases[0].target_new
    loc = fact_accuracy(model, tok, [(c.locality_prompt, c.locality_ground_truth) for c in cases])
    assert loc["exact"] == 1.0
    records = make_edit_set(world, 3000, style="zsre", seed=0, model=model, tokenizer=tok)
    assert len(records) == 3000


def test_named_edit_sets(shipped):
    from lemoe_easyedit.testbed import is_available, load_edit_set

    model, tok, world = shipped
    assert is_available()
    reqs = load_edit_set("zsre-50-seed1")
    assert reqs == to_requests(make_edit_set(world, 50, style="zsre", seed=1, model=model,
                                             tokenizer=tok))
    reqs[0]["prompt"] = "changed"
    assert load_edit_set("zsre-50-seed1")[0]["prompt"] != "changed"
    with pytest.raises(ValueError):
        load_edit_set("wikibio")
