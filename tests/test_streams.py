"""A stream delivered in many calls: ``max_experts``, the open expert, the caller's RNG."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from conftest import fact_requests, load_model, rel
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, load_edits,
                            remove_edit, save_edits)


def hp_for(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    return dataclasses.replace(hp, model_name=str(path), **kw)


@pytest.mark.parametrize("planning", [False, True])
def test_max_experts_bounds_a_stream_delivered_in_many_calls(tiny_models, planning):
    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path, edits_per_expert=4, max_experts=3, max_steps=80,
                order_planning=planning)
    reqs = fact_requests(12)
    start = 0
    for size in (1, 3, 2, 1, 5):        # 12 edits in five calls, online and batch mixed
        apply_lemoe_to_model(model, tok, reqs[start:start + size], hp)
        start += size
        layer = find_adaptor(model)
        assert len(layer.slots) == -(-start // 4)   # the open expert is filled first
    assert [len(s.edits) for s in layer.slots] == [4, 4, 4]
    assert all(s.frozen for s in layer.slots)
    assert sorted(e["prompt"] for s in layer.slots for e in s.edits) == \
        sorted(r["prompt"] for r in reqs)
    assert rel(model, tok, reqs) == 1.0
    # One edit more would need a fourth expert: refused by name, nothing lost.
    with torch.no_grad():
        before = model(**tok([r["prompt"] for r in reqs[:3]], return_tensors="pt",
                             padding=True)).logits
    more = fact_requests(13)[12:]
    for call in (more, more + fact_requests(14)[13:]):
        with pytest.raises(ValueError, match=r"max_experts=3 would be exceeded: the model "
                                             r"holds 3 experts"):
            apply_lemoe_to_model(model, tok, call, hp)
    assert len(layer.slots) == 3 and rel(model, tok, reqs) == 1.0
    with torch.no_grad():
        after = model(**tok([r["prompt"] for r in reqs[:3]], return_tensors="pt",
                            padding=True)).logits
    assert torch.equal(before, after)


def test_a_partly_filled_expert_takes_the_next_calls_edits(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path, edits_per_expert=5, max_experts=2, max_steps=80, order_planning=False)
    reqs = fact_requests(10)
    apply_lemoe_to_model(model, tok, reqs[:3], hp)
    layer = find_adaptor(model)
    assert len(layer.slots) == 1 and layer.open_slot is layer.slots[0]
    apply_lemoe_to_model(model, tok, reqs[3:10], hp)   # 2 fill the open one, 5 a new one
    assert [len(s.edits) for s in layer.slots] == [5, 5]
    assert [e["prompt"] for e in layer.slots[0].edits] == [r["prompt"] for r in reqs[:5]]
    assert rel(model, tok, reqs) == 1.0
    # A prompt the open expert holds, edited again in a batch call, replaces its record.
    model2, _ = load_model(path)
    apply_lemoe_to_model(model2, tok, reqs[:3], hp)
    again = dict(reqs[1], target_new="Oslo" if reqs[1]["target_new"] != "Oslo" else "Lima")
    apply_lemoe_to_model(model2, tok, [again, reqs[3]], hp)
    slot = find_adaptor(model2).slots[0]
    assert [e["prompt"] for e in slot.edits].count(reqs[1]["prompt"]) == 1
    assert rel(model2, tok, [again]) == 1.0


def test_no_edit_path_touches_the_callers_random_state(tiny_models, tmp_path):
    """Batch (with K-means planning), online, the learned and the anchor router with radii,
    remove_edit, save and load: the global torch, numpy and random states are untouched."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    reqs = fact_requests(12)
    apply_lemoe_to_model(model, tok, reqs[:10], hp_for(path, edits_per_expert=4,
                                                       max_steps=20, order_planning=True))
    apply_lemoe_to_model(model, tok, reqs[10:11], hp_for(
        path, max_steps=20, router="anchor", query_pool="ffn_input", negatives_per_edit=2))
    remove_edit(model, tok, reqs[0]["prompt"])
    save_edits(model, tmp_path / "e")
    load_edits(load_model(path)[0], tmp_path / "e")
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all()))
    # And the same seed still gives the same adaptor, whatever the caller's RNG did.
    torch.manual_seed(5)
    m1, _ = load_model(path)
    apply_lemoe_to_model(m1, tok, reqs[:4], hp_for(path, max_steps=10))
    torch.rand(100)
    m2, _ = load_model(path)
    apply_lemoe_to_model(m2, tok, reqs[:4], hp_for(path, max_steps=10))
    s1, s2 = find_adaptor(m1).slots[0].state_dict(), find_adaptor(m2).slots[0].state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("name,layers", [("llama-7b", 32), ("mistral-7b", 32),
                                         ("qwen2.5-7b", 28), ("gpt-j-6b", 28),
                                         ("gpt2-xl", 48)])
def test_paper_model_yamls_sit_at_the_papers_depth_and_say_so(name, layers):
    """Layer 18 of 32 in the paper; the other depths at the same relative depth, and every
    "N of M" a YAML's comments state about its model names the layer it sets."""
    import re

    from lemoe_easyedit.hparams import resolve_hparams_path

    path = resolve_hparams_path(name)
    hp = LEMoEHyperParams.from_hparams(path)
    assert hp.layer == round(18 / 32 * layers)
    comments = " ".join(line.split("#", 1)[1] for line in path.read_text().splitlines()
                        if "#" in line)
    stated = [int(n) for n, m in re.findall(r"(\d+) of (\d+)", comments) if int(m) == layers]
    assert stated and all(n == hp.layer for n in stated), stated
    assert hp.max_experts == 5 and hp.edits_per_expert == 200
