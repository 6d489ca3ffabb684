"""The realfact model builder: records -> tokenizer -> tiny LLaMA that knows their facts.

Every build here is tiny (a few dozen records written below, a 32-wide model) and takes
seconds. Tests that read the shared benchmark files skip when ``../shared/data`` is absent.
"""

import json
import random
from pathlib import Path

import pytest
import torch

from lemoe_easyedit.realfact import build as rf_build
from lemoe_easyedit.realfact import default_data_dir, known_requests, load_realfact
from lemoe_easyedit.realfact.knowledge import score_answers
from lemoe_easyedit.realfact.records import read_records
from lemoe_easyedit.realfact.tokenizer import concatenation_failures
from lemoe_easyedit.testbed.model import ModelSpec

FIRST = ["Ada", "Boris", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jana",
         "Kofi", "Lena", "Milo", "Nora", "Otto", "Pia"]
LAST = ["Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad"]
CITIES = ["Lisbon", "Krakow", "Nairobi", "Osaka", "Quito", "Tallinn", "Dakar", "Hanoi"]
LANGS = ["Finnish", "Swahili", "Tagalog", "Basque", "Welsh", "Hungarian"]


def _people(n, seed):
    rng = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    rng.shuffle(names)
    return names[:n]


def counterfact_records(n=16, seed=0):
    """EasyEdit-format CounterFact records; the locality prompt asks another person."""
    rng = random.Random(seed)
    people = _people(2 * n, seed)
    out = []
    for i in range(n):
        true, new = rng.sample(CITIES, 2)
        subj, other = people[i], people[n + i]
        out.append({"case_id": 100 + i, "prompt": f"{subj} was born in",
                    "target_new": new, "ground_truth": true, "subject": subj,
                    "rephrase_prompt": f"The birthplace of {subj} is",
                    "locality_prompt": f"{other} was born in",
                    "locality_ground_truth": rng.choice(CITIES)})
    return out


def zsre_records(n=12, seed=1):
    """MEND-format zsRE records with NQ-style locality questions."""
    rng = random.Random(seed)
    people = _people(n, seed + 10)
    out = []
    for i, subj in enumerate(people):
        true, new = rng.sample(LANGS, 2)
        out.append({"subject": subj, "src": f"What language did {subj} speak?",
                    "answers": [true], "alt": new,
                    "rephrase": f"Which language was spoken by {subj}?",
                    "loc": f"nq question: who painted mural number {i}",
                    "loc_ans": rng.choice(FIRST) + " " + rng.choice(LAST)})
    return out


# 4 layers: the realfact YAMLs edit layer 3 (run test below).
TINY = ModelSpec(hidden_size=48, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                 tie_word_embeddings=True)


def _write(tmp, name, records):
    path = Path(tmp) / name
    path.write_text(json.dumps(records))
    return str(path)


def _build(tmp, out_name, epochs, seed=0, save=True):
    cf = _write(tmp, "cf.json", counterfact_records())
    zs = _write(tmp, "zsre.json", zsre_records())
    bg = _write(tmp, "bg.json", counterfact_records(6, seed=7))
    spec = rf_build.RealFactSpec(seed=seed, vocab_size=400, epochs=epochs, lr=1e-2,
                                 batch_size=16, warmup_steps=5, repeat={})
    return rf_build.build_realfact(Path(tmp) / out_name, [cf, f"{zs}:10"], [bg], spec=spec,
                                   model_spec=TINY, progress=False, save=save)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("realfact")
    info = _build(tmp, "tiny-llama-rf", epochs=60)
    return tmp, info


def test_build_writes_a_loadable_llama_that_knows_its_facts(tiny_build):
    tmp, info = tiny_build
    path = Path(tmp) / "tiny-llama-rf"
    model, tok = load_realfact(path)
    assert model.config.vocab_size == len(tok)
    assert (path / "training_text.txt").read_text().count("\n") > 0
    saved = json.loads((path / "build_info.json").read_text())
    assert [s["records"] for s in saved["sources"]] == [16, 10, 6]
    knowledge = saved["knowledge"]
    cf = knowledge["cf.json"]["fields"]
    # trained on the true facts: known; never trained on the new targets: not produced
    assert cf["prompt"]["exact"] >= 0.9 and cf["rephrase_prompt"]["exact"] >= 0.9
    assert cf["new_target"]["exact"] <= 0.1
    assert knowledge["zsre.json"]["fields"]["src"]["wild"] >= 0.9
    # the model ends facts with </s>: free generation stops right after the object
    assert cf["prompt"]["wild"] == pytest.approx(cf["prompt"]["exact"], abs=0.1)


def test_build_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = _build(tmp_path, "a-llama", epochs=2, save=False)
    after = torch.rand(3)
    assert torch.equal(after, expected)  # the caller's RNG stream is untouched
    b = _build(tmp_path, "b-llama", epochs=2, save=False)
    sa, sb = a["_model"].state_dict(), b["_model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = _build(tmp_path, "c-llama", epochs=2, seed=1, save=False)
    assert not torch.equal(sa["model.embed_tokens.weight"],
                           c["_model"].state_dict()["model.embed_tokens.weight"])


def test_tokenizer_round_trips_the_records(tiny_build):
    tmp, info = tiny_build
    _, tok = load_realfact(Path(tmp) / "tiny-llama-rf")
    texts, pairs = [], []
    for rec in counterfact_records():
        for key in ("prompt", "rephrase_prompt", "locality_prompt"):
            texts.append(rec[key])
        pairs += [(rec["prompt"], rec["ground_truth"]), (rec["prompt"], rec["target_new"])]
    for rec in zsre_records():
        texts += [rec["src"], rec["rephrase"], rec["loc"], rec["loc_ans"]]
        pairs += [(rec["src"], rec["answers"][0]), (rec["loc"], rec["loc_ans"])]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # text the tokenizer never saw still encodes (byte fallback) and decodes back
    assert tok.decode(tok("Zürich ünïcode")["input_ids"], skip_special_tokens=True) \
        == "Zürich ünïcode"
    assert concatenation_failures(tok, pairs) == []


def test_known_filter_drops_unknown_probes_and_says_why(tiny_build):
    tmp, _ = tiny_build
    model, tok = load_realfact(Path(tmp) / "tiny-llama-rf")
    reqs = []
    for rec in counterfact_records():
        reqs.append({"case_id": rec["case_id"], "prompt": rec["prompt"],
                     "target_new": rec["target_new"], "ground_truth": rec["ground_truth"],
                     "subject": rec["subject"], "rephrase_prompt": rec["rephrase_prompt"],
                     "locality": {"neighborhood": {"prompt": rec["locality_prompt"],
                                                   "ground_truth": rec["locality_ground_truth"]}}})
    # the same request with a locality answer the model was never taught
    bad = json.loads(json.dumps(reqs[0]))
    bad["case_id"] = 999
    bad["locality"]["neighborhood"]["ground_truth"] = "Atlantis"
    kept, dropped = known_requests(model, tok, reqs + [bad])
    assert (999, ["locality:neighborhood"]) in dropped
    assert all(r["case_id"] != 999 for r in kept)
    # what is kept is exactly what the scorer calls known
    scores = score_answers(model, tok, [(r["prompt"], r["ground_truth"]) for r in kept])
    assert all(s.exact for s in scores)
    assert len(kept) + len(dropped) == len(reqs) + 1


def test_records_read_both_formats_and_slices(tmp_path):
    cf = _write(tmp_path, "cf.json", counterfact_records())
    zs = _write(tmp_path, "zs.json", zsre_records())
    facts, skipped = read_records(cf, limit=5)
    assert len(facts) == 5 and skipped == []
    assert set(facts[0].probes) == {"prompt", "rephrase_prompt", "locality_prompt"}
    facts, _ = read_records(zs)
    assert set(facts[0].probes) == {"src", "rephrase", "loc"} and facts[0].new_target
    with pytest.raises(ValueError):
        read_records(cf, limit=100)


def test_conflicting_answers_keep_the_first():
    from lemoe_easyedit.realfact.records import FactRecord

    a = FactRecord("counterfact", 0, 0, {"prompt": ("X is in", "Paris")}, "Rome")
    b = FactRecord("counterfact", 1, 1, {"locality_prompt": ("X is in", "Oslo")}, None)
    pairs, conflicts = rf_build.collect_training([a, b], {"prompt": 2})
    assert pairs == [("X is in", "Paris")] * 2
    assert conflicts[0]["kept"] == "Paris" and conflicts[0]["dropped"] == "Oslo"


def test_the_model_learns_to_say_every_object_never_a_new_fact():
    from lemoe_easyedit.realfact.records import FactRecord

    a = FactRecord("counterfact", 0, 0, {"prompt": ("X is in", "Paris"),
                                         "locality_prompt": ("Y is in", "Oslo")}, "Rome")
    b = FactRecord("zsre", 1, 1, {"src": ("Where is Z?", "Paris")}, "Lima")
    pairs = rf_build.say_pairs([a, b], times=2)
    said = sorted({o for _, o in pairs})
    assert said == ["Lima", "Oslo", "Paris", "Rome"] and len(pairs) == 8
    assert all(p == rf_build.SAY_PROMPT.format(o) for p, o in pairs)
    # the object is followed by a space in the prompt: spelt as an answer is
    assert rf_build.SAY_PROMPT.format("Rome").split("Rome")[1].startswith(" ")
    assert rf_build.say_pairs([a, b], times=0) == []


def test_default_model_can_say_each_new_target(tmp_path):
    """A token the model never emits cannot be made its answer by any edit of hidden
    states; the default build teaches it to say every object (true and new) in a copying
    prompt, and still never to give a new target as a fact."""
    from lemoe_easyedit import realfact

    data = default_data_dir()
    if data is None or not realfact.is_available():
        pytest.skip("needs ../shared/data and the shipped realfact model")
    model, tok = load_realfact(realfact.shipped_model_path())
    cf, _ = read_records(data / "counterfact" / "counterfact-edit-1k.json", limit=1000)
    said = score_answers(model, tok, [(rf_build.SAY_PROMPT.format(f.new_target), f.new_target)
                                      for f in cf])
    as_fact = score_answers(model, tok, [(f.edit_prompt[0], f.new_target) for f in cf])
    assert sum(s.exact for s in said) / len(cf) >= 0.95
    assert sum(s.exact for s in as_fact) / len(cf) <= 0.01


def test_shared_files_read_when_present():
    data = default_data_dir()
    if data is None:
        pytest.skip("no ../shared/data here (a fresh clone): the shared benchmark files are "
                    "not part of the repository")
    cf, _ = read_records(data / "counterfact" / "counterfact-edit-1k.json", limit=20)
    zs, _ = read_records(data / "zsre" / "zsre_mend_train-1k.json", limit=20)
    assert len(cf) == 20 and len(zs) == 20
    assert all(f.new_target for f in cf)


def test_run_accepts_the_model_by_name_and_filters_known_records(tiny_build, tmp_path,
                                                                 monkeypatch):
    """``run`` with the realfact YAML from another working directory: the model given by
    path, the records it knows kept (the one it does not know is left out and recorded),
    edit targets ending with ``</s>``, WILD scores and the same-subject probe reported."""
    from lemoe_easyedit.evaluation import runner

    tmp, _ = tiny_build
    records = counterfact_records()[:6]
    # Every other record asked with its paraphrase instead (the model knows both), and no
    # paraphrase kept: the records then hold two questions and each subject can be asked the
    # other one (a probe equal to the record's own paraphrase would be passed over).
    for r in records[1::2]:
        r["prompt"] = r["rephrase_prompt"]
    for r in records:
        r["rephrase_prompt"] = ""
    unknown = dict(records[0], case_id=999, locality_ground_truth="Atlantis")
    data = _write(tmp_path, "edits.json", records + [unknown])
    yaml_path = Path(__file__).resolve().parents[1] / "hparams" / "LEMoE" / "realfact-llama.yaml"
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert runner.main(["run", "--method", "LEMoE", "--hparams", str(yaml_path),
                        "--model", str(Path(tmp) / "tiny-llama-rf"), "--data", "counterfact",
                        "--data-path", data, "--num-edits", "4", "--threads", "1",
                        "--same-subject-probes", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    known = res["data"]["known_filter"]
    assert 999 in known["dropped_case_ids"]
    assert known["wrong_by_probe"].get("locality:neighborhood", 0) >= 1
    assert res["protocol"]["edit_end_token"] == "</s>"
    assert {"rel_wild", "gen_wild", "loc_wild"} <= set(res["summary"])
    assert res["summary"]["rel_em"] >= 0.75
    # The same-subject probes are built after the known filter and scored as their own kind.
    assert res["data"]["same_subject_probes"] == {"records_without_one": 0}
    assert {"loc_em:same_subject", "loc_em:neighborhood"} <= set(res["summary"])


def test_default_model_resolves_by_name_from_anywhere(tmp_path, monkeypatch):
    """``tiny-llama-realfact`` and the YAML's relative ``model_name`` both reach the default
    model (shipped in the package) whatever the working directory."""
    from lemoe_easyedit import realfact
    from lemoe_easyedit.hparams_files import resolve_relative
    from lemoe_easyedit.realfact.integration import resolve_model_name

    if not realfact.is_available():
        pytest.skip("the default realfact model is not shipped in this checkout "
                    "(build it: python -m lemoe_easyedit.realfact.build)")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("tiny-llama-realfact") == str(realfact.shipped_model_path())
    yaml_path = Path(__file__).resolve().parents[1] / "hparams" / "MEMIT" / "realfact-llama.yaml"
    import yaml

    hp = yaml.safe_load(yaml_path.read_text())
    model = resolve_relative(hp["model_name"], yaml_path)
    assert Path(model).resolve() == realfact.shipped_model_path().resolve()
    assert Path(resolve_relative(hp["mom2_dataset"], yaml_path)).is_file()
