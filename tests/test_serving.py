"""The serving forward: routing in tensors, one read of the routes, ``torch.compile``."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import UNRELATED, fact_requests
from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor
from lemoe_easyedit.routing import QueryBuilder, select_routes

SETUPS = [dict(router="anchor", query_pool="ffn_input", negatives_per_edit=2),
          dict(router="learned", query_pool="prefix_mean", locality_guard=False),
          dict(router="anchor", query_pool="prefix_mean", top_k=2),
          dict(router="subject", query_pool="ffn_input")]


def edited(tiny_models, **kw):
    path = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    hp = dataclasses.replace(hp, model_name=str(path), edits_per_expert=3, max_steps=30,
                             order_planning=False, **kw)
    apply_lemoe_to_model(model, tok, fact_requests(9), hp)
    return model, tok


def batch(tok):
    tok.padding_side = "left"
    return tok([r["prompt"] for r in fact_requests(4)] + UNRELATED[:2], return_tensors="pt",
               padding=True)


@pytest.mark.parametrize("setup", SETUPS)
def test_routing_makes_no_host_read_and_the_forward_one(tiny_models, monkeypatch, setup):
    model, tok = edited(tiny_models, **setup)
    layer = find_adaptor(model)
    x = batch(tok)
    reads, inside = [], [False]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _n=name, **k):
            if inside[0]:
                reads.append(_n)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)

    def within(fn):   # count only inside LEMoE's code: its layer and its model-level hook
        def wrapped(*a, **k):
            inside[0] = True
            try:
                return fn(*a, **k)
            finally:
                inside[0] = False
        return wrapped

    layer.forward = within(layer.forward)
    monkeypatch.setattr(QueryBuilder, "__call__", within(QueryBuilder.__call__))
    layer.routing_table()                      # built once per change, not per forward
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(**x)
        assert (layer.last_routes.expert >= 0).any()   # experts really ran
        assert len(reads) <= 1, reads                  # the dispatch's one read of the routes
        reads.clear()
        within(layer.route)(*layer.queries.current(seen["x"]))
    hook.remove()
    del layer.forward
    assert reads == []                                 # routing itself: tensors only


@pytest.mark.parametrize("setup", SETUPS[:2])
def test_routing_compiles_as_one_graph_and_the_model_compiles(tiny_models, setup):
    model, tok = edited(tiny_models, **setup)
    layer = find_adaptor(model)
    hp = layer.hparams
    table = layer.routing_table()
    q = torch.nn.functional.normalize(torch.randn(2, 5, layer.hidden), dim=-1)
    valid = torch.ones(2, 5, dtype=torch.bool)

    def route(q, valid):
        return select_routes(q, valid, table, router=hp.router, top_k=hp.top_k,
                             guard=hp.locality_guard, threshold=hp.guard_threshold).expert

    compiled_route = torch.compile(route, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled_route(q, valid), route(q, valid))
    x = batch(tok)
    with torch.no_grad():
        ref = model(**x).logits
        compiled = torch.compile(model, backend="aot_eager")
        got = compiled(**x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("setup", [SETUPS[0], SETUPS[3]])
def test_the_compiled_forward_is_one_graph_with_few_experts(tiny_models, monkeypatch, setup):
    """Routing (the subject router's id matching included) traces into the graph. With up
    to COMPILED_DENSE_EXPERTS experts the compiled forward runs each on every position and
    is one graph; with more it reads the routes once (its only graph break)."""
    from lemoe_easyedit import layer as layer_module

    model, tok = edited(tiny_models, **setup)
    assert len(find_adaptor(model).slots) == 3
    x = batch(tok)
    with torch.no_grad():
        ref = model(**x).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(**x).logits
        torch._dynamo.reset()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(layer_module, "COMPILED_DENSE_EXPERTS", 2)
        explain = torch._dynamo.explain(model)(**x)
        torch._dynamo.reset()
    where = {b.user_stack[-1].name for b in explain.break_reasons if b.user_stack}
    assert explain.graph_break_count >= 1 and where == {"_add_expert_outputs"}, where
