"""Prompt variants (``prompt_variants``, ``prompt_dropout``): what a variant keeps, how its
answer is routed in training, and that older saves load without the fields."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoTokenizer

from conftest import fact_requests, load_model
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, load_edits,
                            save_edits)
from lemoe_easyedit.subjects import subject_positions
from lemoe_easyedit.training import (EncodedEdit, batch_routes, encode_edits, prompt_variants,
                                     training_batches)


def variant_hp(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    kw = {"router": "subject", "query_pool": "ffn_input", "locality_guard": True,
          "edits_per_expert": 1, "max_steps": 40, "order_planning": False,
          "prompt_variants": 3, **kw}
    return dataclasses.replace(hp, model_name=str(path), **kw)


def test_a_variant_keeps_its_kept_positions_and_the_whole_target():
    edit = EncodedEdit(list(range(100, 112)) + [7, 8], prompt_len=12)
    keep = {0, 4, 5, 11}
    variants = prompt_variants(edit, keep, 200, 0.5, torch.Generator().manual_seed(0))
    dropped = 0
    for v in variants:
        prompt, target = v.input_ids[:v.prompt_len], v.input_ids[v.prompt_len:]
        assert target == [7, 8]
        assert prompt == sorted(prompt) and set(prompt) <= set(range(100, 112))
        assert {100, 104, 105, 111} <= set(prompt)
        dropped += 12 - len(prompt)
    assert 0.4 < dropped / (200 * 8) < 0.6  # 8 droppable tokens a variant
    again = prompt_variants(edit, keep, 200, 0.5, torch.Generator().manual_seed(0))
    assert [v.input_ids for v in again] == [v.input_ids for v in variants]
    assert all(v.input_ids == edit.input_ids for v in
               prompt_variants(edit, keep, 3, 0.0, torch.Generator().manual_seed(0)))


def test_subject_positions_find_the_subjects_last_occurrence(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models("llama"))
    request = {"prompt": "Ada Lovelace met Ada Lovelace in the city of", "subject": "Ada Lovelace"}
    ids = tok(request["prompt"])["input_ids"]
    span = subject_positions(tok, request, ids)
    assert tok.decode(ids[span.start:span.stop]).strip() == "Ada Lovelace"
    assert subject_positions(tok, request, ids[:span.start]).stop <= span.start  # the first one
    assert len(subject_positions(tok, {**request, "subject": "Grace Hopper"}, ids)) == 0
    assert len(subject_positions(tok, {"prompt": request["prompt"]}, ids)) == 0


def test_a_variants_answer_is_routed_as_its_edits_answer(tiny_models):
    """The guard would keep a variant's answer from the expert (its context differs from the
    edit's); training routes it as the edit's answer, as serving routes an admitted
    paraphrase. Without that copy the test's premise shows: some variant position is left
    unrouted."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    request = fact_requests(1)[0]
    hp = variant_hp(path, guard_threshold=0.999, prompt_dropout=0.6)
    model, _ = apply_lemoe_to_model(model, tok, [request], hp)
    layer = find_adaptor(model)
    edits = encode_edits(tok, [request], hp.max_length)
    batch = training_batches(edits, layer.slots[0].edits, tok, hp,
                             torch.Generator().manual_seed(1), "cpu")[0]
    assert batch.origin.tolist() == [0, 0, 0, 0]
    routes = batch_routes(model, layer, batch).expert[..., 0]
    answers = [routes[r][batch.anchor_mask[r]].tolist() for r in range(4)]
    assert answers[0] == [0] * len(answers[0])  # the edit's own answer reaches its expert
    assert answers[1:] == [answers[0]] * 3
    batch.origin = None
    plain = batch_routes(model, layer, batch).expert[..., 0]
    assert any((plain[r][batch.anchor_mask[r]] == -1).any() for r in range(1, 4))


def test_edits_trained_with_variants_are_served(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    requests = fact_requests(4)
    hp = variant_hp(path, locality_guard=False, max_steps=80)
    model, _ = apply_lemoe_to_model(model, tok, requests, hp)
    for r in requests:
        ids = tok(r["prompt"], return_tensors="pt")
        n = len(tok(" " + r["target_new"], add_special_tokens=False)["input_ids"])
        out = model.generate(**ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip() == r["target_new"]


def test_older_saves_load_without_prompt_variants(tiny_models, tmp_path):
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(1), variant_hp(path, max_steps=5))
    save_edits(model, tmp_path / "edits")
    manifest = tmp_path / "edits" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["hparams"]["prompt_variants"] == 3
    for field in ("prompt_variants", "prompt_dropout"):  # a save from before the fields
        del data["hparams"][field]
    manifest.write_text(json.dumps(data))
    fresh, _ = load_model(path)
    load_edits(fresh, tmp_path / "edits")
    hp = find_adaptor(fresh).hparams
    assert (hp.prompt_variants, hp.prompt_dropout) == (0, 0.5)
    with pytest.raises(ValueError, match="prompt_dropout"):
        variant_hp(path, prompt_dropout=-0.1)
