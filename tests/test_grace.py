"""The project's GRACE: codebook rules, untouched far inputs, learned edits, EasyEdit glue."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from conftest import UNRELATED, fact_requests, load_model
from lemoe_easyedit import grace
from lemoe_easyedit.grace import (GraceAdapter, GraceHyperParams, apply_grace_to_model,
                                  find_grace, remove_grace)

REPO = Path(__file__).resolve().parents[1]

#: The keys of upstream EasyEdit's GraceHyperParams (its constructor takes no others).
UPSTREAM_KEYS = {"edit_lr", "n_iter", "eps", "dist_fn", "val_init", "val_train", "val_reg",
                 "reg", "replacement", "eps_expand", "num_pert", "dropout", "inner_params",
                 "device", "alg_name", "model_name", "batch_size", "max_length",
                 "model_parallel"}


def adapter(eps=1.0, **kw):
    torch.manual_seed(0)
    return GraceAdapter(nn.Linear(4, 3), "mlp.down_proj", eps, **kw)


def vec(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------- codebook rules


def test_new_key_when_far_and_first_key():
    a = adapter(eps=1.0)
    info = a.update_codebook(vec(0, 0, 0, 0), [5], torch.zeros(3), edit_id=0)
    assert info["action"] == "add" and a.num_keys == 1
    assert a.epsilons.tolist() == [1.0]
    # Beyond eps_init + eps of the nearest key (distance 3 > 1 + 1): a second key.
    info = a.update_codebook(vec(3, 0, 0, 0), [6], torch.zeros(3), edit_id=1)
    assert info["action"] == "add" and a.num_keys == 2
    assert a.epsilons.tolist() == [1.0, 1.0]


def test_same_label_expands_the_radius():
    a = adapter(eps=1.0)
    a.update_codebook(vec(0, 0, 0, 0), [5, 7], torch.zeros(3), edit_id=0)
    info = a.update_codebook(vec(1.5, 0, 0, 0), [5, 7], torch.zeros(3), edit_id=1)
    assert info == {"key": 0, "action": "expand", "nearest": pytest.approx(1.5)}
    assert a.num_keys == 1
    assert a.epsilons.tolist() == [pytest.approx(1.5, rel=1e-3)]
    assert a.key_edits == [[0, 1]]
    # Inside the radius already: nothing changes but the value is reused.
    info = a.update_codebook(vec(0.5, 0, 0, 0), [5, 7], torch.zeros(3), edit_id=2)
    assert info["action"] == "reuse" and a.epsilons.tolist() == [pytest.approx(1.5, rel=1e-3)]


def test_moving_average_expansion_moves_the_key():
    a = adapter(eps=1.0, eps_expand="moving_average")
    a.update_codebook(vec(0, 0, 0, 0), [5], torch.zeros(3), edit_id=0)
    a.update_codebook(vec(1.5, 0, 0, 0), [5], torch.zeros(3), edit_id=1)
    assert a.keys[0].tolist() == pytest.approx([0.75, 0, 0, 0])
    assert a.epsilons.tolist() == [pytest.approx(1.5, rel=1e-3)]


def test_different_label_splits_the_radii():
    a = adapter(eps=1.0)
    a.update_codebook(vec(0, 0, 0, 0), [5], torch.zeros(3), edit_id=0)
    info = a.update_codebook(vec(1.2, 0, 0, 0), [6], torch.zeros(3), edit_id=1)
    assert info["action"] == "split" and info["other"] == 0 and a.num_keys == 2
    e0, e1 = a.epsilons.tolist()
    assert e0 < 0.6 and e1 <= 0.6 + 1e-6 and e0 + e1 < 1.2   # the two balls no longer overlap
    # Each query is served by its own key now; the midpoint region by nobody.
    dist, idx = a.nearest(torch.stack([vec(0.1, 0, 0, 0), vec(1.1, 0, 0, 0)]))
    assert idx.tolist() == [0, 1]
    assert bool((dist <= a.epsilons[idx]).all())


def test_far_input_passes_through_and_near_input_is_replaced():
    a = adapter(eps=0.5)
    a.update_codebook(vec(0, 0, 0, 0), [5], vec(7, 8, 9), edit_id=0)
    x = torch.stack([vec(0.1, 0, 0, 0), vec(5, 5, 5, 5), vec(-3, 1, 0, 2)])[None]  # [1, 3, 4]
    with torch.no_grad():
        out = a(x)
        base = a.layer(x)
    assert out[0, 0].tolist() == [7, 8, 9]                 # hit: value replaces the output
    assert torch.equal(out[0, 1:], base[0, 1:])            # far: the module's own output
    # replace_all (causal): the hit token and every later token get the value.
    a.replacement = "replace_all"
    x2 = torch.stack([vec(5, 5, 5, 5), vec(0, 0, 0, 0.1), vec(5, 5, 5, 5)])[None]
    with torch.no_grad():
        out2 = a(x2)
    assert torch.equal(out2[0, 0], a.layer(x2)[0, 0])
    assert out2[0, 1].tolist() == [7, 8, 9] and out2[0, 2].tolist() == [7, 8, 9]


def test_the_edit_being_trained_owns_its_key_token():
    """During value training the key token uses the trained vector even if rounding puts
    it just outside the radius (a T=1000 run once stopped on a value with no gradient)."""
    a = adapter(eps=0.5)
    a.update_codebook(vec(0, 0, 0, 0), [5], vec(7, 8, 9), edit_id=0)
    trained = nn.Parameter(vec(1, 2, 3))
    a._training = (0, trained, 1)
    x = torch.stack([vec(5, 5, 5, 5), vec(0.5001, 0, 0, 0)])[None]   # just outside
    out = a(x)
    a._training = None
    assert out[0, 1].tolist() == [1, 2, 3]
    out[0, 1].sum().backward()
    assert trained.grad is not None and trained.grad.tolist() == [1, 1, 1]
    with torch.no_grad():
        assert torch.equal(a(x)[0, 1], a.layer(x)[0, 1])   # at inference: a miss


def test_hparams_yaml_files_load_and_match_upstream_keys():
    files = sorted((REPO / "hparams" / "GRACE").glob("*.yaml"))
    assert {f.stem for f in files} >= {"testbed-llama", "llama-7b", "mistral-7b"}
    for f in files:
        raw = yaml.safe_load(f.read_text())
        assert set(raw) <= UPSTREAM_KEYS, (f, set(raw) - UPSTREAM_KEYS)
        hp = GraceHyperParams.from_hparams(str(f))
        assert hp.alg_name == "GRACE" and hp.batch_size == 1
    assert {f.name for f in dataclasses.fields(GraceHyperParams)} == UPSTREAM_KEYS
    with pytest.raises(ValueError, match="replacement"):
        GraceHyperParams(model_name="x", replacement="replace_prompt")


# ----------------------------------------------------------------------- on a model


def hparams_for(path, **kw):
    cfg = dict(model_name=str(path), inner_params=["model.layers[3].mlp.down_proj.weight"],
               edit_lr=1.0, n_iter=40, eps=1.0, val_init="cold", replacement="replace_last",
               device=0, max_length=40)
    cfg.update(kw)
    return GraceHyperParams(**cfg)


def teacher_forced_match(model, tok, prompt, target):
    p = tok(prompt)["input_ids"]
    f = tok(prompt + " " + target)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([f])).logits[0]
    pred = logits[len(p) - 1:len(f) - 1].argmax(-1).tolist()
    return pred == f[len(p):], f[len(p):]


@pytest.mark.parametrize("replacement", ["replace_last", "replace_all"])
def test_edits_are_learned_and_far_inputs_untouched(tiny_models, replacement):
    model, tok = load_model(tiny_models("llama"))
    # Single-token targets: a randomly initialised model cannot be steered to two different
    # tokens by one vector (multi-token targets: test_multi_token_targets_on_the_testbed).
    requests = fact_requests(6)
    probe = tok(UNRELATED[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**probe).logits
    # The random tiny model puts all these prompts within ~0.02 of each other at this
    # layer: a radius well below that gives every edit its own key.
    hp = hparams_for(tiny_models("llama"), replacement=replacement, eps=1e-3)
    edited, weights = apply_grace_to_model(model, tok, requests, hp)
    assert edited is model and weights == {}
    g = find_grace(model)
    assert g is not None and g.num_keys == len(requests)
    for r in requests:
        ok, target_ids = teacher_forced_match(model, tok, r["prompt"], r["target_new"])
        assert ok, r
        # Generation with a KV cache reproduces the target too.
        x = tok([r["prompt"]], return_tensors="pt")
        out = model.generate(**x, max_new_tokens=len(target_ids), do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert out[0, x["input_ids"].shape[1]:].tolist() == target_ids, r
    with torch.no_grad():
        after = model(**probe).logits
    assert torch.equal(before, after)          # inputs far from every key: untouched
    assert remove_grace(model) and find_grace(model) is None


def test_release_restore_switches_new_keys_off(tiny_models):
    model, tok = load_model(tiny_models("llama"))
    hp = hparams_for(tiny_models("llama"))
    apply_grace_to_model(model, tok, fact_requests(2), hp)
    x = tok([r["prompt"] for r in fact_requests(4)], return_tensors="pt", padding=True)
    with torch.no_grad():
        kept = model(**x).logits
    _, weights = apply_grace_to_model(model, tok, fact_requests(4)[2:], hp,
                                      keep_original_weight=True)
    assert set(weights) == {f"model.layers.3.mlp.down_proj.{k}"
                            for k in ("keys", "values", "epsilons", "active")}
    # What EasyEdit's release does with them:
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name)[...] = value
        restored = model(**x).logits
    assert torch.equal(restored, kept)
    apply_grace_to_model(model, tok, fact_requests(5)[4:], hp)
    assert find_grace(model).num_keys <= 3   # switched-off keys were pruned


def test_registered_only_when_easyeditor_lacks_grace():
    from easyeditor.util.alg_dict import ALG_DICT

    assert grace.IMPLEMENTATION == "lemoe_easyedit"
    assert ALG_DICT["GRACE"] is apply_grace_to_model
    saved = ALG_DICT["GRACE"]

    def upstream_grace(*a, **k):  # what an upstream checkout would have registered
        return None

    ALG_DICT["GRACE"] = upstream_grace
    try:
        assert grace.register() == "easyeditor"
        assert ALG_DICT["GRACE"] is upstream_grace
    finally:
        ALG_DICT["GRACE"] = saved


def test_through_base_editor(tiny_models, in_tmp):
    from easyeditor import BaseEditor

    hp = hparams_for(tiny_models("llama"))
    editor = BaseEditor.from_hparams(hp)
    requests = fact_requests(3)
    metrics, model, _ = editor.edit(
        prompts=[r["prompt"] for r in requests],
        target_new=[r["target_new"] for r in requests],
        ground_truth=[r["ground_truth"] for r in requests],
        subject=[r["subject"] for r in requests], keep_original_weight=False)
    assert all(m["post"]["rewrite_acc"] == [1.0] for m in metrics), metrics
    assert find_grace(editor.model).num_keys >= 1


def _testbed():
    try:
        from lemoe_easyedit import testbed
    except ImportError:
        return None
    return testbed if testbed.is_available() else None


@pytest.mark.skipif(_testbed() is None, reason="the embedded testbed is not in this checkout")
def test_multi_token_targets_on_the_testbed():
    """The testbed's targets are two-word names (several tokens): every edit is reproduced
    by greedy decoding, and unrelated facts keep their answers."""
    from lemoe_easyedit import evaluation as ev

    requests = _testbed().load_edit_set("counterfact-12")
    hp = GraceHyperParams.from_hparams(str(REPO / "hparams" / "GRACE" / "testbed-llama.yaml"))
    hp.model_name = str(_testbed().testbed_model_path())
    assert max(len(ev.target_token_ids(_tok(hp), r["prompt"], r["target_new"])[1])
               for r in requests) >= 2
    res = ev.run_protocol("GRACE", hp, requests, progress=False)
    assert [m["rel_em"] for m in res["per_edit"]] == [1.0] * len(requests)
    assert res["summary"]["loc"] == 1.0 and res["summary"]["loc_em"] == 1.0


def _tok(hp):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hp.model_name)


# ----------------------------------------------------------------------- conflicts served


def test_same_key_with_a_new_label_is_replaced_in_place():
    a = adapter(eps=1.0)
    a.update_codebook(vec(1, 2, 0, 0), [5], torch.zeros(3), edit_id=0)
    info = a.update_codebook(vec(1, 2, 0, 0), [6], torch.ones(3), edit_id=1)
    assert info["action"] == "replace" and info["key"] == 0 and a.num_keys == 1
    assert a.key_labels == [(6,)] and a.key_edits == [[1]]
    assert a.epsilons.tolist() == [1.0] and a.values[0].tolist() == [1.0, 1.0, 1.0]


def test_radii_must_be_positive():
    a = adapter(eps=1.0)
    with pytest.raises(ValueError, match="radius must be positive"):
        a._add(vec(0, 0, 0, 0).reshape(1, -1), torch.zeros(1, 3), 0.0, (5,), 0, "add")
    assert a.num_keys == 0


def test_re_edit_and_split_are_served_on_a_real_model(tiny_models):
    """The same prompt edited again with a new target is served the new target; two close
    prompts with different targets (the split path) are both served, without forcing."""
    model, tok = load_model(tiny_models("llama"))
    reqs = fact_requests(2)
    hp = hparams_for(tiny_models("llama"), eps=1e3)  # every prompt inside every radius
    apply_grace_to_model(model, tok, [reqs[0]], hp)
    again = dict(reqs[0], target_new=next(c for c in ("Oslo", "Lima", "Cairo")
                                          if c != reqs[0]["target_new"]))
    apply_grace_to_model(model, tok, [again], hp)
    g = find_grace(model)
    assert g.num_keys == 1 and g.history[-1]["action"] == "replace"
    assert teacher_forced_match(model, tok, again["prompt"], again["target_new"])[0]
    other = dict(reqs[1], target_new="Tokyo")
    apply_grace_to_model(model, tok, [other], hp)
    assert g.num_keys == 2 and g.history[-1]["action"] == "split"
    assert bool((g.epsilons > 0).all())
    for r in (again, other):
        assert teacher_forced_match(model, tok, r["prompt"], r["target_new"])[0], r
    # Expand: a second prompt with the same label as the only key.
    model, tok = load_model(tiny_models("llama"))
    first, second = (dict(r, target_new="Tokyo") for r in fact_requests(2))
    apply_grace_to_model(model, tok, [first], dataclasses.replace(hp, eps=1e-3))
    apply_grace_to_model(model, tok, [second], dataclasses.replace(hp, eps=1e3))
    g = find_grace(model)
    assert g.num_keys == 1 and g.history[-1]["action"] == "expand"
    for r in (first, second):
        assert teacher_forced_match(model, tok, r["prompt"], r["target_new"])[0], r


def test_an_edit_its_prompt_cannot_reach_fails_and_is_undone(tiny_models, monkeypatch):
    model, tok = load_model(tiny_models("llama"))
    reqs = fact_requests(2)
    hp = hparams_for(tiny_models("llama"), eps=1e-3)
    apply_grace_to_model(model, tok, [reqs[0]], hp)
    g = find_grace(model)
    before = g.snapshot()
    real = GraceAdapter.update_codebook

    def moved_away(self, query, label, init_value, edit_id):
        info = real(self, query, label, init_value, edit_id)
        with torch.no_grad():
            self.keys[info["key"]] += 10.0   # training still forces the key token
        return info

    monkeypatch.setattr(GraceAdapter, "update_codebook", moved_away)
    with pytest.raises(RuntimeError, match="does not reach its own key"):
        apply_grace_to_model(model, tok, [reqs[1]], hp)
    assert g.num_keys == 1 and torch.equal(g.keys, before["keys"])
    assert torch.equal(g.values, before["values"])
    assert teacher_forced_match(model, tok, reqs[0]["prompt"], reqs[0]["target_new"])[0]
