"""Device maps: every tensor follows its consumer's device.

Without GPUs, the test that can really tell a misplaced tensor is accelerate's offloading:
a module placed on ``"disk"`` (or offloaded ``"cpu"``) keeps its weights on the ``meta``
device at rest and gets them only inside its own forward, through accelerate's hooks, which
also move that module's inputs. Code that reads such a weight outside the module's forward
(the routing queries' embedding lookup, an expert copying the host FFN, the checksums of a
save), or that hands a tensor to a module without going through its hooks, fails on
``meta``. The model below has its embeddings and two of its blocks offloaded, and the
adapted block and the LM head in memory.
"""

import dataclasses

import pytest
import torch

from conftest import UNRELATED, fact_requests, load_model
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, load_edits,
                            save_edits)
from lemoe_easyedit.training import collate, encode_edits

pytest.importorskip("accelerate")

DEVICE_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


def load(path, offload_dir=None):
    kw = {} if offload_dir is None else dict(device_map=DEVICE_MAP,
                                             offload_folder=str(offload_dir))
    return load_model(path, **kw)


def hp_for(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")   # layer 2: the block kept in memory
    kw = {"edits_per_expert": 5, "max_steps": 40, "order_planning": False, **kw}
    return dataclasses.replace(hp, model_name=str(path), **kw)


def logits(model, tok, texts):
    tok.padding_side = "right"
    x = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**x).logits * x["attention_mask"].unsqueeze(-1)


@pytest.mark.parametrize("router,pool,cached", [("learned", "prefix_mean", True),
                                                ("anchor", "ffn_input", True),
                                                ("anchor", "prefix_mean", False)])
def test_editing_and_serving_under_an_offloading_device_map(tiny_models, tmp_path, router,
                                                            pool, cached):
    path = tiny_models("llama")
    plain, tok = load(path)
    mapped, _ = load(path, tmp_path / "offload")
    assert mapped.model.embed_tokens.weight.device.type == "meta"   # really offloaded
    assert mapped.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    hp = hp_for(path, router=router, query_pool=pool, cached_activations=cached)
    reqs = fact_requests(8)
    texts = [r["prompt"] for r in reqs] + UNRELATED[:3]
    for model in (plain, mapped):
        apply_lemoe_to_model(model, tok, reqs[:6], hp)      # batch mode
        apply_lemoe_to_model(model, tok, reqs[6:7], hp)     # online mode
    torch.testing.assert_close(logits(mapped, tok, texts), logits(plain, tok, texts),
                               rtol=1e-5, atol=1e-5)
    assert find_adaptor(mapped).slots[0].expert.w_in.weight.device.type == "cpu"
    # Generation with a KV cache routes through the same hook.
    x = tok(reqs[0]["prompt"], return_tensors="pt")
    outs = [m.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
            for m in (plain, mapped)]
    assert torch.equal(*outs)
    # Saved from the mapped model, loaded into a plain one and the reverse.
    save_edits(mapped, tmp_path / "from-mapped")
    save_edits(plain, tmp_path / "from-plain")
    fresh_plain, _ = load(path)
    fresh_mapped, _ = load(path, tmp_path / "offload2")
    load_edits(fresh_plain, tmp_path / "from-mapped")
    load_edits(fresh_mapped, tmp_path / "from-plain")
    ref = logits(plain, tok, texts)
    for m in (fresh_plain, fresh_mapped):
        torch.testing.assert_close(logits(m, tok, texts), ref, rtol=1e-5, atol=1e-5)


def test_routing_queries_follow_the_embedding_device(tiny_models, tmp_path):
    """The training path builds queries from the embeddings wherever they live, with the
    batch's mask moved to them (an offloaded embedding is called through its hook)."""
    path = tiny_models("llama")
    mapped, tok = load(path, tmp_path / "offload")
    hp = hp_for(path)
    apply_lemoe_to_model(mapped, tok, fact_requests(2), hp)
    layer = find_adaptor(mapped)
    b = collate(encode_edits(tok, fact_requests(3), 40), tok.pad_token_id, "cpu")
    from lemoe_easyedit.training import edit_queries
    q = edit_queries(mapped, layer, b)
    assert q.device.type == "cpu" and q.dtype == torch.float32 and torch.isfinite(q).all()
