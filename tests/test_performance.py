"""Performance work that must not change results: cached-activation training, the stacked
routing table, grouped expert evaluation; and the benchmark end to end at a tiny size."""

import dataclasses
import gc
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from conftest import UNRELATED, fact_requests, load_model
from lemoe_easyedit import LEMoEHyperParams, apply_lemoe_to_model, find_adaptor
from lemoe_easyedit.injection import inject_adaptor
from lemoe_easyedit.model_families import get_submodule
from lemoe_easyedit.routing import Routes, RoutingTable, select_routes
from lemoe_easyedit.training import encode_edits, train_slot

YAML = {"llama": "tiny-llama", "gpt2": "tiny-gpt2"}


def hp_for(family, path, **kw):
    hp = LEMoEHyperParams.from_hparams(YAML[family])
    return dataclasses.replace(hp, model_name=str(path), **kw)


def train_two_experts(path, hp, tok, requests):
    """Two experts of 10 edits each, the second trained with the first one frozen."""
    model, _ = load_model(path)
    layer = inject_adaptor(model, hp)
    trace = []
    for i in range(2):
        slot = layer.new_slot(seed=hp.seed + i)
        slot.edits = requests[10 * i:10 * (i + 1)]  # the records (subjects) of its edits
        edits = encode_edits(tok, requests[10 * i:10 * (i + 1)], hp.max_length)
        train_slot(model, layer, i, edits, tok, hp, progress=False, trace=trace)
        slot.freeze()
    return model, layer, trace


# -- cached-activation training ---------------------------------------------------------

@pytest.mark.parametrize("family,layer,top_k,router,variants", [
    ("llama", 2, 1, "learned", 0),
    ("gpt2", 1, 1, "learned", 0),
    ("llama", 3, 2, "learned", 0),   # the adaptor in the last block; top-2 gates
    ("gpt2", 3, 1, "anchor", 0),     # last block, anchor router
    ("llama", 1, 1, "subject", 2),   # prompt variants, routed as their edits' answers
    ("gpt2", 2, 2, "learned", 2),
])
def test_cached_and_full_forward_training_agree(tiny_models, family, layer, top_k, router,
                                                variants):
    path = tiny_models(family)
    tok = AutoTokenizer.from_pretrained(path)
    requests = fact_requests(20)
    # Several minibatches per expert, and no early stop: every step is compared.
    base = hp_for(family, path, layer=layer, top_k=top_k, router=router, max_steps=24,
                  train_batch_size=4, loss_threshold=0.0, locality_guard=top_k == 1,
                  prompt_variants=variants)
    runs = {}
    for cached in (True, False):
        hp = dataclasses.replace(base, cached_activations=cached)
        _, lay, trace = train_two_experts(path, hp, tok, requests)
        runs[cached] = (trace, [p.detach().clone() for p in lay.slots.parameters()])
    (tc, wc), (tf, wf) = runs[True], runs[False]
    assert len(tc) == len(tf) == 48
    torch.testing.assert_close(torch.tensor(tc), torch.tensor(tf), rtol=1e-4, atol=1e-6)
    assert tc[-1] < tc[0]  # it did train
    for a, b in zip(wc, wf):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cached_training_runs_nothing_below_the_adaptor_per_step(tiny_models):
    path = tiny_models("llama")
    tok = AutoTokenizer.from_pretrained(path)
    counts = {}
    for cached in (True, False):
        hp = hp_for("llama", path, layer=2, max_steps=12, train_batch_size=4,
                    loss_threshold=0.0, cached_activations=cached)
        model, _ = load_model(path)
        layer = inject_adaptor(model, hp)
        below = get_submodule(model, "model.layers.1")
        calls = []
        below.register_forward_hook(lambda *a: calls.append(1))
        layer.new_slot(seed=0)
        train_slot(model, layer, 0, encode_edits(tok, fact_requests(10), 40), tok, hp,
                   progress=False)
        counts[cached] = len(calls)
    assert counts[True] == 3            # one capture per fixed minibatch (10 edits / 4)
    assert counts[False] == 12          # a full forward per step


def test_training_leaves_no_gradient_state(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    requires = {p: p.requires_grad for p in model.parameters()}
    hp = hp_for("llama", path, edits_per_expert=5, max_steps=20)
    apply_lemoe_to_model(model, tok, fact_requests(10), hp)
    apply_lemoe_to_model(model, tok, fact_requests(12)[10:], hp)
    layer = find_adaptor(model)
    assert len(layer.slots) == 3
    assert all(p.grad is None for p in model.parameters())
    assert layer.open_slot is layer.slots[2]   # partly filled (2 of 5): open for the next call
    for slot in layer.slots[:2]:
        assert slot.frozen
        assert not any(p.requires_grad for p in slot.parameters())
    assert all(p.grad is None for p in layer.slots[2].parameters())
    assert all(p.requires_grad == r for p, r in requires.items())  # base model untouched
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch objects warns
        warnings.simplefilter("ignore")
        assert not [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]


# -- routing table ----------------------------------------------------------------------

def reference_routes(query, valid, slots, *, router, top_k, guard, threshold):
    """select_routes as it was before the table: one expert at a time."""
    B, T, _ = query.shape
    flat = query.reshape(B * T, -1)
    n = len(slots)
    enabled = [s.is_enabled for s in slots]
    near = torch.full((B * T, n), -2.0)
    for i, s in enumerate(slots):
        if enabled[i] and s.anchors.numel():
            near[:, i] = (flat @ s.anchors.float().t()).max(dim=1).values
    if router == "anchor":
        scores = near + torch.arange(n, dtype=torch.float32) * 1e-6
    else:
        r = [s.routing for s in slots]   # v = W_up SiLU(W_down q), score k . v, in float32
        scores = torch.stack([(F.silu(flat @ p.down.weight.float().t()) @ p.up.weight.float().t())
                              @ p.key.float() for p in r], 1)
    scores = scores.masked_fill(torch.tensor([not e for e in enabled]), float("-inf"))
    k = min(top_k, sum(enabled))
    top, idx = scores.topk(k, dim=1)
    gate = torch.softmax(top, dim=1)
    if guard:
        idx[near.gather(1, idx) < threshold] = -1
    idx[~valid.reshape(-1)] = -1
    gate = gate.masked_fill(idx < 0, 0.0)
    expert = torch.full((B * T, top_k), -1, dtype=torch.long)
    gates = torch.zeros(B * T, top_k)
    expert[:, :k], gates[:, :k] = idx, gate
    return expert.reshape(B, T, top_k), gates.reshape(B, T, top_k)


def _layer_with_slots(tiny_models, n, **kw):
    path = tiny_models("llama")
    model, tok = load_model(path)
    layer = inject_adaptor(model, hp_for("llama", path, **kw))
    torch.manual_seed(0)
    for i in range(n):
        slot = layer.new_slot()
        slot.anchors = F.normalize(torch.randn(3 + i % 4, layer.hidden), dim=-1)
        torch.nn.init.normal_(slot.expert.w_out.weight, std=0.05)
        slot.freeze()
    return model, tok, layer


@pytest.mark.parametrize("router,top_k,guard", [("learned", 1, False), ("learned", 2, True),
                                                ("anchor", 1, True), ("anchor", 3, False)])
def test_routing_table_matches_the_per_expert_reference(tiny_models, router, top_k, guard):
    model, tok, layer = _layer_with_slots(tiny_models, 7, router=router, top_k=top_k,
                                          locality_guard=guard, guard_threshold=0.2)
    layer.slots[3].enabled.data.zero_()
    q = torch.cat([F.normalize(torch.randn(3, 5, layer.hidden), dim=-1),
                   layer.slots[2].anchors[:2].reshape(1, 2, -1).expand(3, 2, -1)], 1)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, -2:] = False
    got = layer.route(q, valid)
    exp_e, exp_g = reference_routes(q, valid, list(layer.slots), router=router, top_k=top_k,
                                    guard=guard, threshold=0.2)
    assert torch.equal(got.expert, exp_e)
    torch.testing.assert_close(got.gate, exp_g, rtol=1e-5, atol=1e-6)
    assert not (got.expert == 3).any()


def test_routing_table_is_rebuilt_exactly_when_a_slot_changes(tiny_models):
    model, tok, layer = _layer_with_slots(tiny_models, 5, locality_guard=True,
                                          guard_threshold=0.2)
    q = F.normalize(torch.randn(2, 6, layer.hidden), dim=-1)
    valid = torch.ones(2, 6, dtype=torch.bool)

    def check(rebuilt: bool):
        before = layer.__dict__.get("_routing_table")
        got = layer.route(q, valid)
        table = layer.__dict__["_routing_table"]
        assert (table is not before) == rebuilt
        exp_e, _ = reference_routes(q, valid, list(layer.slots), router="learned", top_k=1,
                                    guard=True, threshold=0.2)
        assert torch.equal(got.expert, exp_e)

    check(True)
    check(False)                                      # nothing changed: reused
    layer.new_slot().anchors = q[0, :3].clone()       # a slot added (and its anchors set)
    check(True)
    with torch.no_grad():                             # EasyEdit's in-place restore
        layer.slots[0].enabled[...] = 0.0
    check(True)
    with torch.no_grad():                             # ... of another slot, after that rebuild
        layer.slots[3].enabled.fill_(0.0)
    check(True)
    layer.slots[1].anchors = q[1].clone()             # anchors replaced
    flag = layer.slots[0].enabled
    check(True)
    assert layer.slots[0].enabled is flag             # flags are never replaced
    layer.slots[1].freeze()                           # plain attributes: not read by the
    layer.slots[1].edits = layer.slots[1].edits + [{"case_id": 1}]  # table, no rebuild
    check(False)
    state = {k: v.clone() for k, v in layer.slots[2].state_dict().items()}
    state["routing.key"] = torch.randn_like(state["routing.key"])
    layer.slots[2].load_state_dict(state)             # loaded in place
    check(True)
    layer.remove_slot(4)                              # a slot removed
    check(True)
    model.to(torch.float64)                           # moved: dtype changes, versions don't
    assert "_routing_table" not in layer.__dict__
    layer.route(q, valid)
    assert layer.__dict__["_routing_table"].down.dtype == torch.float32  # routing stays fp32
    check(False)


def test_flags_keep_their_values_and_save(tiny_models, tmp_path):
    from lemoe_easyedit.persistence import load_edits, save_edits

    model, tok, layer = _layer_with_slots(tiny_models, 3, router="anchor", top_k=1)
    layer.slots[1].enabled.data.zero_()
    table = layer.routing_table()
    assert [s.is_enabled for s in layer.slots] == [True, False, True]
    assert table.enabled.tolist() == [True, False, True]
    assert all(not s.enabled.requires_grad for s in layer.slots)
    assert dict(layer.named_parameters())["slots.1.enabled"] is layer.slots[1].enabled
    save_edits(model, tmp_path / "edits")
    fresh, _ = load_model(tiny_models("llama"))
    loaded = find_adaptor(load_edits(fresh, tmp_path / "edits"))
    assert [s.is_enabled for s in loaded.slots] == [True, False, True]


def test_table_sees_in_place_writes_to_any_flag(tiny_models):
    model, tok, layer = _layer_with_slots(tiny_models, 3, router="anchor", top_k=1)
    flags = [s._parameters["enabled"] for s in layer.slots]
    table = RoutingTable(layer.slots)
    assert all(a is b for a, b in zip(flags, (s._parameters["enabled"] for s in layer.slots)))
    assert table.is_current() and table.live == 3
    with torch.no_grad():
        layer.slots[2].enabled[...] = 0.0             # an in-place write to one flag
    assert not table.is_current()
    assert RoutingTable(layer.slots).live == 2


def test_table_of_no_slots_routes_nowhere():
    q = F.normalize(torch.randn(2, 3, 8), dim=-1)
    r = select_routes(q, torch.ones(2, 3, dtype=torch.bool), RoutingTable([]),
                      router="learned", top_k=2, guard=False, threshold=0.0)
    assert r.expert.shape == (2, 3, 2) and (r.expert == -1).all() and (r.gate == 0).all()


# -- expert evaluation ------------------------------------------------------------------

def test_forward_calls_each_routed_expert_once_on_its_positions(tiny_models, monkeypatch):
    from lemoe_easyedit import layer as layer_module

    model, tok, layer = _layer_with_slots(tiny_models, 20, locality_guard=False)
    calls = {}
    # Serving multiplies by each expert's weights (experts.hidden_of), not its module.
    owner = {s.expert.w_in.weight.data_ptr(): i for i, s in enumerate(layer.slots)}
    real = layer_module.hidden_of
    monkeypatch.setattr(layer_module, "hidden_of", lambda w, x: (
        calls.setdefault(owner[w[1].data_ptr()], []).append(x.shape[0]), real(w, x))[1])
    tok.padding_side = "left"
    x = tok([r["prompt"] for r in fact_requests(6)] + UNRELATED[:2], return_tensors="pt",
            padding=True)
    with torch.no_grad():
        got = model(**x).logits
    routes = layer.last_routes.expert[..., 0]
    used = routes[routes >= 0]
    assert sorted(calls) == sorted(set(used.tolist()))
    assert all(len(v) == 1 for v in calls.values())
    assert {i: v[0] for i, v in calls.items()} == {i: int((used == i).sum()) for i in calls}

    # Same logits as evaluating every routed position naively, one at a time.
    def naive(module, args, out):
        xs = args[0]
        base = module.base_layer(xs)
        r = module.last_routes
        extra = torch.zeros_like(base)
        for b in range(xs.shape[0]):
            for t in range(xs.shape[1]):
                for j in range(r.expert.shape[-1]):
                    e = int(r.expert[b, t, j])
                    if e >= 0:
                        extra[b, t] += r.gate[b, t, j] * module.slots[e].expert(xs[b, t])
        return base + module.hparams.expert_scale * extra

    handle = layer.register_forward_hook(naive)
    with torch.no_grad():
        ref = model(**x).logits
    handle.remove()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_one_expert_for_every_position_takes_the_fast_path(tiny_models):
    model, tok, layer = _layer_with_slots(tiny_models, 3, locality_guard=False)
    x = torch.randn(2, 4, layer.hidden)
    layer.forced_routes = Routes(torch.full((2, 4, 1), 1), torch.ones(2, 4, 1))
    with torch.no_grad():
        fast = layer(x)
        ref = layer.base_layer(x) + layer.slots[1].expert(x)
    layer.forced_routes = Routes(torch.full((2, 4, 1), -1), torch.zeros(2, 4, 1))
    with torch.no_grad():
        none = layer(x)
    layer.forced_routes = None
    torch.testing.assert_close(fast, ref)
    assert torch.equal(none, layer.base_layer(x))


# -- the benchmark ----------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_runs_end_to_end_at_a_tiny_size(tiny_models, tmp_path):
    import lemoe_bench as bench

    out = tmp_path / "bench"
    status = bench.main([
        "--model", str(tiny_models("llama")), "--out", str(out),
        "--methods", "LEMoE", "ROME", "GRACE", "FT",
        "--stream", "4,8", "--window", "4", "--edits-per-expert", "4", "--experts", "1,2",
        "--baseline-edits", "2", "--grace-edits", "2", "--train-edits", "8",
        "--latency-prompts", "2",
        "--gen-tokens", "2", "--repeats", "1", "--rounds", "2"])
    res = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert status == 0, json.dumps(res["methods"], indent=1)[:3000]
    assert set(res) == {"settings", "methods", "training", "targets"}
    assert set(res["methods"]) == {"LEMoE", "ROME", "MEMIT", "GRACE", "FT"}
    assert res["methods"]["MEMIT"]["status"] == "n/a"
    for m in ("LEMoE", "ROME", "GRACE", "FT"):
        r = res["methods"][m]
        assert r["status"] == "ok", (m, r)
        for key in ("seconds_per_edit", "edits_per_second", "time_ratio_to_lemoe",
                    "peak_rss_bytes", "rss_above_base_bytes", "rewrite_acc"):
            assert key in r, (m, key)
    for m in ("LEMoE", "ROME", "GRACE", "FT"):    # the fastest of two rounds
        r = res["methods"][m]
        assert len(r["rounds"]) == 2 and r["seconds"] == min(r["rounds"]), (m, r["rounds"])
    le = res["methods"]["LEMoE"]
    assert set(le["seconds_per_edit_at"]) == {"4", "8"} and len(le["protocol"]) == 2
    for p in le["protocol"]:                         # one T's blocks: one round together
        assert len(p["rounds"]) == 2 and p["seconds"] == min(p["rounds"])
        kept = p["rounds"].index(p["seconds"])
        assert all(len(b["rounds"]) == 2 for b in p["blocks"])
        assert sum(b["rounds"][kept] for b in p["blocks"]) == pytest.approx(
            p["seconds"] * len(p["blocks"]))
        # Every block trained (its experts' steps from the layer's history), and the time
        # per edit splits into steps per edit and time per step.
        assert all(b["steps"] >= b["experts"] for b in p["blocks"])
        assert p["seconds_per_edit"] == pytest.approx(p["steps_per_edit"] * p["seconds_per_step"])
    assert "Protocol growth T=8 / T=4: time per edit" in md
    assert le["seconds_per_edit"] == le["protocol"][-1]["seconds_per_edit"]
    inst = le["installments"]
    assert set(inst["seconds_per_edit_at"]) == {"4", "8"}
    for t, per_round in inst["rounds"].items():      # each window's fastest round
        assert len(per_round) == 2 and inst["seconds_per_edit_at"][t] == min(per_round)
    assert [s["experts"] for s in inst["serving"]] == [1, 2]
    for key in ("forward_ratio", "batch_forward_ratio", "gen_ratio", "forward_ms_base",
                "gen_tokens_per_s"):
        assert key in inst["serving"][0]
    for key in ("expert_bytes", "routing_table_bytes", "tensor_bytes_above_base",
                "rss_growth_after_first_bytes", "anon_growth_after_first_bytes"):
        assert key in inst
    tr = res["training"]
    assert tr["status"] == "ok" and tr["same_steps"] and tr["max_rel_loss_diff"] < 1e-4
    assert {"speedup", "cached_seconds", "full_seconds"} <= set(tr)
    assert {t["target"] for t in res["targets"]} >= {
        "throughput_vs_grace", "throughput_vs_rome", "cached_speedup", "latency_5",
        "latency_100", "stream_growth", "marginal_growth", "memory", "anon_memory",
        "anon_growth", "tensor_growth"}
    for heading in ("## Editing cost", "## LEMoE cost along the stream", "## Serving cost",
                    "## Memory after the installments", "## Cached-activation", "## Targets"):
        assert heading in md


def test_anchor_router_gives_exact_ties_to_the_newest_expert_and_skips_disabled(tiny_models):
    model, tok, layer = _layer_with_slots(tiny_models, 4, router="anchor", top_k=1,
                                          locality_guard=True, guard_threshold=0.5)
    shared = F.normalize(torch.randn(2, layer.hidden), dim=-1)
    for i in (0, 1, 2):                      # the same stored queries in three experts
        layer.slots[i].anchors = shared.clone()
    q = shared.reshape(1, 2, -1)
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert layer.route(q, valid).expert.view(-1).tolist() == [2, 2]
    with torch.no_grad():
        layer.slots[2].enabled[...] = 0.0    # switched off: the next newest holder wins
    assert layer.route(q, valid).expert.view(-1).tolist() == [1, 1]
    far = F.normalize(torch.randn(1, 1, layer.hidden), dim=-1)
    got = layer.route(far, torch.ones(1, 1, dtype=torch.bool)).expert.item()
    exp, _ = reference_routes(far, torch.ones(1, 1, dtype=torch.bool), list(layer.slots),
                              router="anchor", top_k=1, guard=True, threshold=0.5)
    assert got == exp.item()


def test_anchor_router_near_ties_go_to_the_newest_expert_real_differences_do_not(tiny_models):
    model, tok, layer = _layer_with_slots(tiny_models, 4, router="anchor", top_k=1,
                                          locality_guard=True, guard_threshold=0.5)
    torch.manual_seed(1)
    q = F.normalize(torch.randn(layer.hidden, dtype=torch.float64), dim=0)
    u = torch.randn(layer.hidden, dtype=torch.float64)
    u = F.normalize(u - (u @ q) * q, dim=0)              # orthogonal to q

    def at_cosine_gap(gap):                               # cos(q, result) = 1 - gap
        d = (2 * gap) ** 0.5
        return F.normalize(q + d * u, dim=0).float().reshape(1, -1)

    valid = torch.ones(1, 1, dtype=torch.bool)
    query = q.float().reshape(1, 1, -1)
    layer.slots[0].anchors = q.float().reshape(1, -1)     # the older expert: exact
    layer.slots[2].anchors = at_cosine_gap(1e-7)          # newer, a few ulps further
    assert layer.route(query, valid).expert.item() == 2  # near-tie: the newest wins
    layer.slots[2].anchors = at_cosine_gap(1e-5)          # newer but really further
    assert layer.route(query, valid).expert.item() == 0


@pytest.mark.parametrize("guard", [True, False])
def test_serving_path_gives_the_routes_and_outputs_of_the_general_path(tiny_models, monkeypatch,
                                                                       guard):
    from lemoe_easyedit import layer as layer_module

    model, tok, layer = _layer_with_slots(tiny_models, 6, router="anchor", top_k=1,
                                          query_pool="ffn_input", locality_guard=guard,
                                          guard_threshold=0.9)
    prompts = ["The capital of France is", "A short one", "Another prompt about the weather"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    x = F.normalize(seen["x"].float(), dim=-1)
    # Anchors at some of these positions' own FFN inputs, so that positions of one prompt go
    # to several experts, others to none (guard) or to the nearest one (no guard).
    layer.slots[1].anchors = x[0, -2:].clone()
    layer.slots[3].anchors = x[2, 2:5].clone()
    layer.slots[4].anchors = x[1, -1:].clone()
    with torch.no_grad():
        layer.slots[2].enabled[...] = 0.0  # EasyEdit's in-place release: never chosen
    single = tok(prompts[2], return_tensors="pt")
    runs = {}
    for name, limit in (("serving", layer_module._PYTHON_GROUPING), ("general", 0)):
        monkeypatch.setattr(layer_module, "_PYTHON_GROUPING", limit)
        with torch.no_grad():
            runs[name] = [(model(**inputs).logits, layer.last_routes.expert.clone())
                          for inputs in (batch, single)]
    for (fast_logits, fast_routes), (ref_logits, ref_routes) in zip(runs["serving"],
                                                                    runs["general"]):
        assert torch.equal(fast_routes, ref_routes)
        torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-6)
    routes = runs["serving"][0][1]
    assert not (routes == 2).any()
    assert len(set(routes[routes >= 0].tolist())) >= 3  # several experts in one forward
    assert not guard or (routes == -1).any()
    assert (routes[~batch["attention_mask"].bool()] == -1).all()  # padding goes nowhere


def test_marginal_time_per_edit_counts_the_calls_ending_in_the_window():
    from lemoe_bench.workers import _marginal_per_edit

    calls = [{"edits": 4, "seconds": 1.0}, {"edits": 8, "seconds": 2.0},
             {"edits": 12, "seconds": 3.0}]
    assert _marginal_per_edit(calls, 8, 4) == pytest.approx(2.0 / 4)
    assert _marginal_per_edit(calls, 12, 8) == pytest.approx(5.0 / 8)
    assert _marginal_per_edit(calls, 4, 4) == pytest.approx(1.0 / 4)
    assert _marginal_per_edit(calls, 2, 1) is None          # no call ends in (1, 2]
