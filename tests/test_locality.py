"""Hard locality: neighbour probes in the testbed's edit sets, per-kind Loc, and the
acceptance radii that keep LEMoE's neighbours' facts."""

import dataclasses
import random

import pytest
import torch

from lemoe_easyedit.locality import NO_RADIUS, NegativePool, fit_radii, subject_swaps
from lemoe_easyedit.testbed import (load_edit_set, load_testbed, make_edit_cases,
                                    score_pairs, shipped_model_path, to_requests)
from lemoe_easyedit.testbed.editsets import LOCALITY_KINDS


@pytest.fixture(scope="module")
def shipped():
    return load_testbed(shipped_model_path())


# --------------------------------------------------------------------------- radii
def test_radius_is_halfway_to_the_nearest_negative_about_another_subject():
    anchors = torch.eye(3)[:2]                      # two anchors, subjects 0 and 1
    negatives = NegativePool(torch.tensor([[0.6, 0.8, 0.0],     # about subject 0
                                           [0.8, 0.6, 0.0],     # about subject 1
                                           [0.0, 0.0, 1.0]]),   # about subject 2
                             torch.tensor([0, 1, 2]))
    radius = fit_radii(anchors, torch.tensor([0, 1]), negatives)
    # Anchor 0 ignores the negative about its own subject: its nearest other is 0.8.
    assert radius.tolist() == pytest.approx([0.9, 0.9])
    assert fit_radii(anchors, torch.tensor([0, 1]), negatives, margin=0.0).tolist() == \
        pytest.approx([0.8, 0.8])
    # Unknown subject (-1): every negative counts, the nearest is about its own subject.
    assert fit_radii(anchors[:1], torch.tensor([-1]), negatives).item() == pytest.approx(0.9)
    # No negative about another subject: no radius, the global guard alone decides.
    only_own = NegativePool(negatives.queries[:1], torch.tensor([0]))
    assert fit_radii(anchors[:1], torch.tensor([0]), only_own).item() == NO_RADIUS
    assert fit_radii(anchors, torch.tensor([0, 1]),
                     NegativePool.empty(3)).tolist() == [NO_RADIUS, NO_RADIUS]
    # A negative equal to the anchor cannot push the radius past the anchor itself.
    same = NegativePool(anchors[:1].clone(), torch.tensor([5]))
    assert fit_radii(anchors[:1], torch.tensor([0]), same).item() < 1.0


def test_subject_swaps_are_deterministic_and_leave_the_global_rng_alone():
    reqs = [{"prompt": f"{s} was born in", "target_new": "X", "subject": s}
            for s in ("Ann Lee", "Bo Kim", "Cy Day")] + [{"prompt": "no subject here",
                                                          "target_new": "Y"}]
    random.seed(123)
    state = random.getstate()
    a = subject_swaps(reqs, ["Ann Lee", "Bo Kim", "Cy Day"], 2, seed=0)
    assert random.getstate() == state
    assert a == subject_swaps(reqs, ["Ann Lee", "Bo Kim", "Cy Day"], 2, seed=0)
    assert len(a) == 6
    for swap, source in zip(a, [r for r in reqs[:3] for _ in range(2)]):
        assert swap["subject"] != source["subject"]
        assert swap["prompt"] == source["prompt"].replace(source["subject"], swap["subject"])
        assert swap["target_new"] == "X"
    assert subject_swaps(reqs, ["Ann Lee"], 0, seed=0) == []


# --------------------------------------------------------------------------- probes
def test_every_testbed_edit_has_neighbour_probes_the_model_knows(shipped):
    model, tok, world = shipped
    cases = make_edit_cases(world, 300, seed=0, model=model, tokenizer=tok)
    edited = {(c.subject, c.relation) for c in cases}
    forbidden = {world.relation(r).prompt(s, t) for s, r in edited
                 for t in range(world.n_templates)}
    assert all(c.same_relation_prompt for c in cases)
    assert sum(c.same_subject_prompt is not None for c in cases) >= 0.95 * len(cases)
    for c in cases:
        assert c.same_relation_prompt not in forbidden
        assert c.subject not in c.same_relation_prompt
        if c.same_subject_prompt is not None:
            assert c.same_subject_prompt not in forbidden
            assert c.subject in c.same_subject_prompt
    pairs = ([(c.same_relation_prompt, c.same_relation_ground_truth) for c in cases]
             + [(c.same_subject_prompt, c.same_subject_ground_truth) for c in cases
                if c.same_subject_prompt])
    assert all(s[1] for s in score_pairs(model, tok, pairs))
    requests = to_requests(cases)
    assert all(set(r["locality"]) <= set(LOCALITY_KINDS) for r in requests)
    assert all({"landmark", "same_relation"} <= set(r["locality"]) for r in requests)


def test_same_relation_probe_uses_the_edit_template(shipped):
    _, _, world = shipped
    cases = make_edit_cases(world, 50, seed=4)  # no model: no filtering
    for c in cases:
        template = world.relation(c.relation).templates[c.prompt_template]
        head, tail = template.split("{s}")
        assert c.same_relation_prompt.startswith(head) and \
            c.same_relation_prompt.endswith(tail)


def test_named_edit_sets_carry_all_kinds():
    reqs = load_edit_set("counterfact-100")
    assert all({"landmark", "same_relation", "same_subject"} <= set(r["locality"])
               for r in reqs)


# --------------------------------------------------------------------------- scoring
def test_scorer_reports_loc_per_kind_and_the_mean_over_kinds(shipped):
    from lemoe_easyedit import LEMoEHyperParams
    from lemoe_easyedit.evaluation import score_requests

    model, tok, _ = shipped
    reqs = load_edit_set("counterfact-20")
    hp = LEMoEHyperParams.from_hparams("testbed-llama")
    # Against another model as "unedited": locality then differs by kind.
    other = load_testbed(shipped_model_path())[0]
    with torch.no_grad():
        for p in other.model.layers[3].mlp.parameters():
            p.mul_(3.0)
    s = score_requests(other, tok, hp, reqs, unedited=model, greedy=True,
                       progress=False)["summary"]
    kinds = [s[f"loc:{k}"] for k in LOCALITY_KINDS]
    assert s["loc"] == pytest.approx(sum(kinds) / 3)
    assert s["loc_em"] == pytest.approx(sum(s[f"loc_em:{k}"] for k in LOCALITY_KINDS) / 3)
    assert s["avg"] == pytest.approx((s["rel"] + s["gen"] + s["loc"]) / 3)


# --------------------------------------------------------------------------- LEMoE
@pytest.mark.slow
def test_lemoe_keeps_its_neighbours_on_a_small_stream(shipped):
    """T=50 on the testbed: neighbour Loc >= 0.95 with the default YAML; without radii
    (the previous method) the same stream loses neighbours."""
    from copy import deepcopy

    from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model

    model, tok, _ = shipped
    reqs = load_edit_set("counterfact-50")
    hp = LEMoEHyperParams.from_hparams("testbed-llama")

    def neighbours(hparams):
        edited, _ = apply_lemoe_to_model(deepcopy(model), tok, deepcopy(reqs), hparams)
        out = {}
        for kind in ("same_relation", "same_subject"):
            pairs = [(r["locality"][kind]["prompt"], r["locality"][kind]["ground_truth"])
                     for r in reqs if kind in r["locality"]]
            out[kind] = sum(s[1] for s in score_pairs(edited, tok, pairs)) / len(pairs)
        out["rel"] = sum(s[1] for s in score_pairs(
            edited, tok, [(r["prompt"], r["target_new"]) for r in reqs])) / len(reqs)
        return out

    kept = neighbours(hp)
    assert kept["rel"] == 1.0
    assert kept["same_relation"] >= 0.95 and kept["same_subject"] >= 0.95, kept
    lost = neighbours(dataclasses.replace(hp, negatives_per_edit=0))
    assert min(lost["same_relation"], lost["same_subject"]) < \
        min(kept["same_relation"], kept["same_subject"]), (lost, kept)


@pytest.mark.slow
def test_online_edits_fit_radii_and_keep_neighbours(shipped):
    """One request per call (EasyEdit's edit()): every slot gets radii fitted against the
    stream so far, each request's swaps are made once, and the neighbours of a short
    online stream keep their answers."""
    from copy import deepcopy

    from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor

    model, tok, _ = shipped
    model = deepcopy(model)
    reqs = load_edit_set("counterfact-30")
    hp = LEMoEHyperParams.from_hparams("testbed-llama")
    for r in reqs:
        apply_lemoe_to_model(model, tok, [deepcopy(r)], hp)
    layer = find_adaptor(model)
    assert all(len(s.radius) == len(s.anchors) and bool((s.radius > -1).all())
               for s in layer.slots)
    # Each request's swaps were made once and kept (the stream is below min_negatives).
    assert len(layer.__dict__["_negative_cache"]) == len(reqs)
    for kind in ("same_relation", "same_subject"):
        pairs = [(r["locality"][kind]["prompt"], r["locality"][kind]["ground_truth"])
                 for r in reqs if kind in r["locality"]]
        assert sum(s[1] for s in score_pairs(model, tok, pairs)) / len(pairs) >= 0.95, kind
    assert all(s[1] for s in score_pairs(model, tok, [(r["prompt"], r["target_new"])
                                                      for r in reqs]))


def test_editing_leaves_the_callers_global_rng_alone(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import fact_requests
    from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model

    path = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    hp = dataclasses.replace(LEMoEHyperParams.from_hparams("tiny-llama"),
                             model_name=str(path), edits_per_expert=3, max_steps=5)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    apply_lemoe_to_model(model, tok, fact_requests(4), hp)          # batch
    apply_lemoe_to_model(model, tok, fact_requests(5)[4:], hp)      # online
    assert torch.equal(torch.rand(3), expected)
