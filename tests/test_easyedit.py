"""LEMoE through EasyEdit's own interface: BaseEditor.edit / batch_edit and its metrics."""

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from conftest import UNRELATED, fact_requests
import lemoe_easyedit
from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor
from lemoe_easyedit.hparams import HPARAMS_DIR

from easyeditor import BaseEditor
from easyeditor.evaluate import compute_edit_quality
from easyeditor.util.alg_dict import ALG_DICT


def hparams_for(path, tmp_path, name="tiny-llama", **overrides):
    cfg = yaml.safe_load((HPARAMS_DIR / f"{name}.yaml").read_text())
    cfg.update(model_name=str(path), **overrides)
    f = tmp_path / "lemoe.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return LEMoEHyperParams.from_hparams(f)


def score(editor, requests, pre_locality):
    """Rel and Loc of ``requests`` on the editor's current model, EasyEdit's metric."""
    rel, loc = [], []
    for r, pre in zip(requests, pre_locality):
        m = compute_edit_quality(editor.model, editor.model_name, editor.hparams, editor.tok, r,
                                 editor.hparams.device)
        rel.append(np.mean(m["rewrite_acc"]))
        post = m["locality"]["neighborhood_output"]
        loc.append(np.mean([np.mean(np.equal(a, b)) for a, b in zip(post, pre)]))
    return float(np.mean(rel)), float(np.mean(loc))


def locality_outputs(editor, requests):
    return [compute_edit_quality(editor.model, editor.model_name, editor.hparams, editor.tok, r,
                                 editor.hparams.device)["locality"]["neighborhood_output"]
            for r in requests]


def edit_kwargs(requests):
    return dict(
        prompts=[r["prompt"] for r in requests],
        target_new=[r["target_new"] for r in requests],
        ground_truth=[r["ground_truth"] for r in requests],
        subject=[r["subject"] for r in requests],
        locality_inputs={"neighborhood": {
            "prompt": [r["locality"]["neighborhood"]["prompt"] for r in requests],
            "ground_truth": [r["locality"]["neighborhood"]["ground_truth"] for r in requests]}},
    )


def test_registered_in_alg_dict():
    assert ALG_DICT["LEMoE"] is apply_lemoe_to_model
    assert lemoe_easyedit.LEMoEHyperParams is LEMoEHyperParams


@pytest.mark.parametrize("family,yaml_name", [("llama", "tiny-llama"), ("gpt2", "tiny-gpt2")])
@pytest.mark.parametrize("mode", ["edit", "batch_edit"])
def test_twenty_edits_through_base_editor(tiny_models, in_tmp, family, yaml_name, mode):
    path = tiny_models(family)
    hp = hparams_for(path, in_tmp, yaml_name)
    editor = BaseEditor.from_hparams(hp)
    requests = fact_requests(20)
    pre_loc = locality_outputs(editor, requests)
    rel0, _ = score(editor, requests, pre_loc)
    assert rel0 < 0.5
    kwargs = edit_kwargs(requests)
    if mode == "batch_edit":
        # The release's batch_edit passes its `locality_prompts` on as `locality_inputs`.
        kwargs["locality_prompts"] = kwargs.pop("locality_inputs")
    getattr(editor, mode)(**kwargs)
    layer = find_adaptor(editor.model)
    assert len(layer.slots) == 2                    # 20 edits, 10 per expert
    rel, loc = score(editor, requests, pre_loc)     # after all 20 edits
    assert rel >= 0.95, rel
    assert loc >= 0.95, loc
    # The edited model still generates and computes a loss with labels.
    tok = editor.tok
    x = tok([requests[0]["prompt"]], return_tensors="pt")
    out = editor.model.generate(**x, max_new_tokens=3, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    assert out.shape[1] == x["input_ids"].shape[1] + 3
    loss = editor.model(input_ids=x["input_ids"], labels=x["input_ids"]).loss
    assert torch.isfinite(loss)


def test_keep_original_weight_restores_the_model(tiny_models, in_tmp):
    path = tiny_models("llama")
    editor = BaseEditor.from_hparams(hparams_for(path, in_tmp))
    requests = fact_requests(3)
    tok = editor.tok
    x = tok(UNRELATED[:3] + [r["prompt"] for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = editor.model(**x).logits
    metrics, model, _ = editor.edit(**edit_kwargs(requests), keep_original_weight=True)
    assert all(m["post"]["rewrite_acc"][0] == 1.0 for m in metrics)   # each edit worked...
    with torch.no_grad():
        after = editor.model(**x).logits
    assert torch.allclose(before, after, atol=0, rtol=0)               # ...and was undone
    # The switched-off experts are pruned at the next call.
    apply_lemoe_to_model(editor.model, tok, fact_requests(4)[3:], editor.hparams)
    assert len(find_adaptor(editor.model).slots) == 1
