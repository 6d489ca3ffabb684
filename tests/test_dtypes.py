"""Host models in float16 / bfloat16: editing, saving across dtypes, ``model.half()``."""

import dataclasses
import json

import pytest
import torch

from conftest import fact_requests, load_model, rel
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, load_edits,
                            save_edits)
from lemoe_easyedit.persistence import MANIFEST, EditsFileError
from lemoe_easyedit.training import collate, encode_edits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def hp_for(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    kw = {"edits_per_expert": 5, "max_steps": 60, "order_planning": False, **kw}
    return dataclasses.replace(hp, model_name=str(path), **kw)


@pytest.mark.parametrize("router,pool", [("learned", "prefix_mean"), ("anchor", "ffn_input"),
                                         ("subject", "ffn_input")])
def test_16_bit_models_edit_with_finite_losses_and_reach_float32_rel(tiny_models, monkeypatch,
                                                                     router, pool):
    path = tiny_models("llama")
    reqs = fact_requests(10)
    states = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, *a, **kw):
        params = list(params)
        states.append({p.dtype for p in params})
        return real_adamw(params, *a, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    rels = {}
    for dtype in DTYPES:
        model, tok = load_model(path, dtype=dtype)
        apply_lemoe_to_model(model, tok, reqs, hp_for(path, router=router, query_pool=pool))
        layer = find_adaptor(model)
        losses = [h["final_loss"] for h in layer.history]
        assert all(torch.isfinite(torch.tensor(losses))), (dtype, losses)
        for slot in layer.slots:   # served in the host's dtype, routed in float32
            assert all(p.dtype == dtype for p in slot.expert.parameters())
            assert all(p.dtype == torch.float32 for p in slot.routing.parameters())
            assert slot.anchors.dtype == torch.float32 and slot.radius.dtype == torch.float32
        rels[dtype] = rel(model, tok, reqs)
    # The optimizer state lives with float32 master copies whatever the host dtype.
    assert states and all(s == {torch.float32} for s in states)
    assert rels[torch.float32] == 1.0
    assert rels[torch.bfloat16] == rels[torch.float32]
    assert rels[torch.float16] == rels[torch.float32]


@pytest.mark.parametrize("saved_in,loaded_in", [(torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16)])
def test_edits_saved_in_one_dtype_load_in_another(tiny_models, tmp_path, saved_in, loaded_in):
    path = tiny_models("llama")
    reqs = fact_requests(10)
    model, tok = load_model(path, dtype=saved_in)
    apply_lemoe_to_model(model, tok, reqs, hp_for(path))
    assert rel(model, tok, reqs) == 1.0
    save_edits(model, tmp_path / "edits")
    fresh, _ = load_model(path, dtype=loaded_in)
    assert load_edits(fresh, tmp_path / "edits") is fresh
    layer = find_adaptor(fresh)
    assert all(p.dtype == loaded_in for s in layer.slots for p in s.expert.parameters())
    assert all(s.anchors.dtype == torch.float32 for s in layer.slots)
    assert rel(fresh, tok, reqs) == 1.0
    # Same routes as the model the edits were saved from.
    b = collate(encode_edits(tok, reqs, 40), tok.pad_token_id, "cpu")
    routes = []
    for m in (model, fresh):
        with torch.no_grad():
            m(input_ids=b.input_ids, attention_mask=b.attention_mask)
        routes.append(find_adaptor(m).last_routes.expert)
    assert torch.equal(*routes)


def test_another_model_is_refused_in_any_dtype(tiny_models, tmp_path):
    from lemoe_easyedit.testing import build_tiny_model
    from conftest import CORPUS

    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(5), hp_for(path))
    save_edits(model, tmp_path / "edits")
    other = build_tiny_model("llama", tmp_path / "other", texts=CORPUS, seed=1)
    for dtype in DTYPES:
        with pytest.raises(EditsFileError, match="different base model"):
            load_edits(load_model(other, dtype=dtype)[0], tmp_path / "edits")


def test_saves_from_before_fingerprints_load_in_their_dtype(tiny_models, tmp_path):
    """A save without the dtype-independent fingerprint (format of earlier versions) is
    checked by its exact checksums: it loads into the dtype it was saved from and into
    float32 (its 16-bit weights are float32's rounded); otherwise the error says why."""
    path = tiny_models("llama")
    reqs = fact_requests(5)
    for saved_in, ok, refused in ((torch.float32, [torch.float32], [torch.bfloat16]),
                                  (torch.bfloat16, [torch.bfloat16, torch.float32], [])):
        model, tok = load_model(path, dtype=saved_in)
        apply_lemoe_to_model(model, tok, reqs, hp_for(path))
        d = tmp_path / f"old-{saved_in}".replace("torch.", "")
        save_edits(model, d)
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["base_model"].pop("fingerprint")
        manifest["base_model"].pop("dtype")
        (d / MANIFEST).write_text(json.dumps(manifest))
        for dtype in ok:
            assert find_adaptor(load_edits(load_model(path, dtype=dtype)[0], d)) is not None
        for dtype in refused:
            with pytest.raises(EditsFileError, match="dtype the edits were saved from"):
                load_edits(load_model(path, dtype=dtype)[0], d)


@pytest.mark.parametrize("router,pool", [("learned", "prefix_mean"), ("anchor", "ffn_input"),
                                         ("subject", "ffn_input")])
def test_half_after_editing_then_another_edit(tiny_models, router, pool):
    path = tiny_models("llama")
    reqs = fact_requests(10)
    model, tok = load_model(path)
    hp = hp_for(path, router=router, query_pool=pool)
    apply_lemoe_to_model(model, tok, reqs[:5], hp)
    model.half()
    layer = find_adaptor(model)
    slot = layer.slots[0]
    # Routing state keeps float32 through .half(); the expert follows the host.
    assert slot.anchors.dtype == torch.float32 and slot.radius.dtype == torch.float32
    assert slot.routing.key.dtype == torch.float32 and slot.enabled.dtype == torch.float32
    assert slot.routing.down.weight.dtype == torch.float32
    assert slot.expert.w_in.weight.dtype == torch.float16
    assert rel(model, tok, reqs[:5]) == 1.0
    apply_lemoe_to_model(model, tok, reqs[5:], hp)
    assert all(torch.isfinite(torch.tensor(h["final_loss"])) for h in layer.history)
    assert rel(model, tok, reqs) == 1.0
    model.to(torch.bfloat16)   # and .to(dtype) likewise
    assert slot.anchors.dtype == torch.float32 and slot.expert.w_in.weight.dtype == torch.bfloat16
    assert rel(model, tok, reqs) == 1.0


def test_torch_dtype_setting_is_validated():
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    assert hp.torch_dtype is None and hp.fp16 is False
    assert dataclasses.replace(hp, torch_dtype="bfloat16").torch_dtype == "bfloat16"
    with pytest.raises(ValueError, match="torch_dtype"):
        dataclasses.replace(hp, torch_dtype="int8")
    with pytest.raises(ValueError, match="fp16"):
        dataclasses.replace(hp, fp16=True, torch_dtype="bfloat16")
