"""Robustness: determinism, fuzzed hparams and requests, truncation, duplicate and
conflicting edits, empty edit lists and diverging training, on tiny local models."""

import dataclasses
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import UNRELATED, fact_requests, load_model
import lemoe_easyedit.training as training
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, find_edit,
                            load_edits, rollback, save_edits)
from lemoe_easyedit.hparams import HPARAMS_DIR
from lemoe_easyedit.training import collate, encode_edits

FIELDS = [f.name for f in dataclasses.fields(LEMoEHyperParams)]
# 25 examples per fuzz test keep this file fast; LEMOE_FUZZ_EXAMPLES=500 for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("LEMOE_FUZZ_EXAMPLES", "25")), deadline=None,
                suppress_health_check=list(HealthCheck))


def hp_for(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    base = dict(model_name=str(path), edits_per_expert=3, max_steps=40)
    base.update(kw)
    return dataclasses.replace(hp, **base)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def adaptor_record(model):
    """Everything of the adaptor that is not a tensor."""
    layer = find_adaptor(model)
    if layer is None:
        return None
    return ([s.frozen for s in layer.slots], [[dict(e) for e in s.edits] for s in layer.slots],
            getattr(layer, "edit_counter", None), list(getattr(layer, "history", [])),
            list(getattr(layer, "plans", [])))


def logits(model, tok, texts):
    x = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**x).logits * x["attention_mask"].unsqueeze(-1)


def produced(model, tok, req):
    e = encode_edits(tok, [req], 40)
    b = collate(e, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lg = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    m = b.labels[:, 1:] != -100
    return bool((lg[:, :-1].argmax(-1)[m] == b.labels[:, 1:][m]).all())


# -- determinism ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["batch", "online"])
def test_same_seed_same_adaptor_bit_for_bit(tiny_models, mode):
    path = tiny_models("llama")
    hp = hp_for(path, max_steps=10)
    runs = []
    for noise in (0, 1):
        torch.manual_seed(1234 + noise)   # the caller's random state must not matter
        torch.rand(17 * noise + 1)
        model, tok = load_model(path)
        if mode == "batch":
            apply_lemoe_to_model(model, tok, fact_requests(7), hp)
        else:
            for r in fact_requests(4):
                apply_lemoe_to_model(model, tok, [r], hp)
        runs.append((state(find_adaptor(model)), adaptor_record(model)))
    (a, ra), (b, rb) = runs
    assert same_state(a, b)
    assert ra == rb                      # same edits per expert, same history and plans
    # A different seed gives a different adaptor (the seed is what is being honoured).
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(7) if mode == "batch" else fact_requests(1),
                         dataclasses.replace(hp, seed=1))
    other = state(find_adaptor(model))
    assert not all(torch.equal(a[k], other[k]) for k in other if k in a)


# -- fuzzing hparams --------------------------------------------------------------------

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 300)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["2e-4", "1e999", "nan", "ffn", "lora", "anchor", "learned", "LEMoE",
                       "prefix_mean", "token", "centroid", "copy", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
BASE_CONFIG = yaml.safe_load((HPARAMS_DIR / "tiny-llama.yaml").read_text())
# Mostly known fields, so that most examples get past the key check into the value checks.
keys = st.sampled_from(["known"] * 10 + ["text", "int"]).flatmap(
    lambda k: {"known": st.sampled_from(FIELDS), "text": st.text(max_size=10),
               "int": st.integers()}[k])


@st.composite
def hparams_dicts(draw):
    """A valid config with 0-4 fields replaced by random values, maybe a field deleted, or
    (rarely) a wholly random dict."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.dictionaries(keys, values, max_size=8))
    config = dict(BASE_CONFIG)
    for _ in range(draw(st.integers(0, 4))):
        config[draw(keys)] = draw(values)
    if draw(st.booleans()):
        config.pop(draw(st.sampled_from(sorted(config, key=repr))), None)
    return config


@FUZZ
@given(config=hparams_dicts())
def test_fuzzed_hparams_dicts_fail_only_with_value_or_type_error(config):
    try:
        hp = LEMoEHyperParams.from_dict(config)
    except (ValueError, TypeError) as exc:
        event(f"refused: {str(exc)[:30]}")
        assert str(exc)
    else:
        event("accepted")
        assert hp.alg_name == "LEMoE" and isinstance(hp.to_dict(), dict)


yaml_text = (hparams_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True))
             | st.text(max_size=60)
             | st.sampled_from(["alg_name: LEMoE\nmodel_name: [x\n", "- a\n- b\n", "",
                                "!!python/object:os.system {}\n", "a: &x [*x]\n",
                                "lr: .inf\nmodel_name: m\n", "model_name: m\nlayer: 1e3\n"]))


@FUZZ
@given(text=yaml_text, raw=st.binary(max_size=20), use_raw=st.booleans())
def test_fuzzed_hparams_files_fail_only_with_value_or_type_error(tmp_path_factory, text, raw,
                                                                 use_raw):
    f = tmp_path_factory.mktemp("yaml") / "hp.yaml"
    if use_raw:
        f.write_bytes(raw)
    else:
        f.write_text(text, encoding="utf-8")
    try:
        LEMoEHyperParams.from_hparams(f)
    except (ValueError, TypeError) as exc:
        event(f"refused: {type(exc).__name__}")
        assert str(exc)


# -- fuzzing requests -------------------------------------------------------------------

words = st.text(max_size=20) | st.sampled_from(
    ["Paris", " Rome", "été à Genève", "東京", "\t\n", "   ", "", "<pad>", "<|endoftext|>",
     "a" * 120, "東京" * 20, "Alice Smith was born in the city of", "The weather is"])
# Mostly strings, so that most requests get past validation into tokenising and training.
field = st.sampled_from(["str"] * 12 + ["none", "int", "list"]).flatmap(
    lambda k: {"str": words, "none": st.none(), "int": st.integers(),
               "list": st.lists(st.text(max_size=3), max_size=2)}[k])


@st.composite
def requests_strategy(draw):
    def one():
        kind = draw(st.sampled_from(["dict"] * 8 + ["other"]))
        if kind == "other":
            return draw(st.none() | st.integers() | st.text(max_size=5) | st.lists(words,
                                                                                  max_size=2))
        r = {"prompt": draw(field), "target_new": draw(field)}
        sub = draw(st.sampled_from(["none", "slice", "random"]))
        if sub == "slice" and isinstance(r["prompt"], str) and r["prompt"]:
            i = draw(st.integers(0, len(r["prompt"]) - 1))
            r["subject"] = r["prompt"][i:i + draw(st.integers(0, 8))]
        elif sub == "random":
            r["subject"] = draw(field)
        for k in ("rephrase_prompt", "ground_truth"):
            if draw(st.booleans()):
                r[k] = draw(field)
        return r

    shape = draw(st.sampled_from(["list"] * 6 + ["single", "single", "other"]))
    if shape == "single":
        return one()
    if shape == "other":
        return draw(st.none() | st.integers() | st.text(max_size=5)
                    | st.tuples(st.integers()))
    return [one() for _ in range(draw(st.integers(0, 3)))]


@pytest.fixture(scope="module")
def edited_save(tiny_models, tmp_path_factory):
    """A tiny llama with one online edit (an open expert), saved for quick resets."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(1), hp_for(path, max_steps=2))
    d = tmp_path_factory.mktemp("fuzz") / "edits"
    save_edits(model, d)
    return path, d


@FUZZ
@given(requests=requests_strategy())
def test_fuzzed_requests_fail_cleanly_and_change_nothing(edited_save, requests):
    path, d = edited_save
    model, tok = load_model(path)
    load_edits(model, d)
    hp = hp_for(path, max_steps=2, route_steps=5, edits_per_expert=2)
    before, record = state(model), adaptor_record(model)
    try:
        apply_lemoe_to_model(model, tok, requests, hp)
    except (ValueError, TypeError) as exc:
        event(f"refused: {type(exc).__name__}: {str(exc)[:40]}")
        assert str(exc)
        assert same_state(before, state(model))
        assert record == adaptor_record(model)
    else:
        event("edited")


# -- bad inputs that are not random -----------------------------------------------------

def test_long_prompt_loses_its_beginning(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    prompt = " ".join(UNRELATED[:4]) + " Alice Smith was born in the city of"
    req = {"prompt": prompt, "target_new": "Lima"}
    full = tok(prompt + " Lima")["input_ids"]
    plen = len(tok(prompt)["input_ids"])
    assert len(full) > 40
    (e,) = encode_edits(tok, [req], 40)
    assert e.input_ids == full[-40:]                      # the prompt's beginning is dropped
    assert e.input_ids[e.prompt_len:] == full[plen:]      # the target is kept whole
    assert len(e.input_ids) - e.prompt_len == len(full) - plen
    with pytest.raises(ValueError, match="needs .* tokens, more than max_length=3 allows"):
        encode_edits(tok, [{"prompt": "Hi", "target_new": "Paris London Berlin Madrid"}], 3)
    apply_lemoe_to_model(model, tok, [req], hp_for(path))
    assert produced(model, tok, req)


def test_a_prompt_of_padding_only_is_refused_and_changes_nothing(tiny_models):
    """Found by the fuzz test: the pad token's embedding is zero, so a prompt of padding
    alone has no prefix-mean query; it used to end as a NaN routing loss."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(1), hp_for(path, max_steps=5))
    before, record = state(model), adaptor_record(model)
    assert tok(tok.pad_token)["input_ids"][-1] == tok.pad_token_id
    with pytest.raises(ValueError, match="no routing query"):
        apply_lemoe_to_model(model, tok, {"prompt": tok.pad_token, "target_new": "0"},
                             hp_for(path, max_steps=2))
    assert same_state(before, state(model))
    assert record == adaptor_record(model)


def test_duplicate_edits_are_kept_once(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    r = fact_requests(2)
    apply_lemoe_to_model(model, tok, [r[0], r[1], dict(r[0])], hp_for(path))
    layer = find_adaptor(model)
    assert sorted(e["prompt"] for s in layer.slots for e in s.edits) == \
        sorted([r[0]["prompt"], r[1]["prompt"]])
    apply_lemoe_to_model(model, tok, [r[0]], hp_for(path))       # online, again
    apply_lemoe_to_model(model, tok, [r[0]], hp_for(path))       # same open expert
    # The batch's expert (2 of 10 edits) stayed open and took both: each prompt once.
    assert len(layer.slots) == 1
    assert [e["prompt"] for e in layer.slots[-1].edits] == [r[1]["prompt"], r[0]["prompt"]]
    assert produced(model, tok, r[0]) and produced(model, tok, r[1])


def _conflict(req, target):
    return dict(req, target_new=target)


def test_conflicting_edits_in_one_call_and_in_the_open_expert(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    r = fact_requests(3)
    a, b = _conflict(r[0], "Paris"), _conflict(r[0], "Tokyo")
    apply_lemoe_to_model(model, tok, [a, r[1], b], hp_for(path))       # one batch call
    assert produced(model, tok, b) and not produced(model, tok, a)
    assert find_edit(model, r[0]["prompt"]).target_new == "Tokyo"
    model, tok = load_model(path)
    for req in (a, r[1], b):                                         # online, one open expert
        apply_lemoe_to_model(model, tok, [req], hp_for(path))
    assert len(find_adaptor(model).slots) == 1
    assert produced(model, tok, b) and not produced(model, tok, a)


@pytest.mark.parametrize("router,pool", [("anchor", "prefix_mean"), ("learned", "prefix_mean"),
                                         ("anchor", "ffn_input"), ("learned", "ffn_input")])
def test_conflicting_edits_across_experts_later_wins(tiny_models, router, pool):
    """A prompt edited again in a later expert: the later target is produced, and rolling
    the later expert back gives the earlier target (exact logits) again."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path, router=router, max_steps=60, query_pool=pool)
    r = fact_requests(6)
    a, b = _conflict(r[0], "Paris"), _conflict(r[0], "Tokyo")
    apply_lemoe_to_model(model, tok, [a, r[1], r[2]], hp)     # expert 0 holds a
    assert produced(model, tok, a)
    texts = [a["prompt"] + " Paris", b["prompt"] + " Tokyo"] + UNRELATED[:2]
    before = logits(model, tok, texts)
    apply_lemoe_to_model(model, tok, [b, r[3], r[4]], hp)     # expert 1 holds b
    assert len(find_adaptor(model).slots) == 2
    assert produced(model, tok, b) and not produced(model, tok, a)
    assert all(produced(model, tok, x) for x in r[1:5])
    assert find_edit(model, a["prompt"]).slot == 1
    rollback(model, last=1)
    assert torch.equal(logits(model, tok, texts), before)
    assert produced(model, tok, a)


def test_empty_edit_list_is_refused(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    before = state(model)
    for empty in ([], ()):
        with pytest.raises(ValueError, match="requests is empty"):
            apply_lemoe_to_model(model, tok, empty, hp_for(path))
    assert find_adaptor(model) is None and same_state(before, state(model))


def _nan_after(n):
    calls = {"n": 0}
    real = training._target_loss

    def loss(logits, labels):
        calls["n"] += 1
        out = real(logits, labels)
        return out * float("nan") if calls["n"] > n else out

    return loss


@pytest.mark.parametrize("mode", ["second batch", "online", "first edit"])
def test_diverging_training_restores_the_model_and_raises(tiny_models, monkeypatch, mode):
    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path, max_steps=5)
    reqs = fact_requests(8)
    if mode != "first edit":
        apply_lemoe_to_model(model, tok, reqs[:1], hp)             # an open expert
    before, record = state(model), adaptor_record(model)
    texts = [r["prompt"] for r in reqs] + UNRELATED[:2]
    ref = logits(model, tok, texts)
    if mode == "second batch":
        monkeypatch.setattr(training, "_target_loss", _nan_after(hp.max_steps + 2))
        args = (reqs[1:7], hp)                                    # 2 batches; the 2nd diverges
    elif mode == "online":
        monkeypatch.setattr(training, "_target_loss", _nan_after(2))
        args = (reqs[1:2], hp)                                    # retrains the open expert
    else:
        monkeypatch.setattr(training, "_target_loss", _nan_after(0))
        args = (reqs[:3], hp)                                     # on a model with no adaptor
    with pytest.raises(FloatingPointError, match="diverged"):
        apply_lemoe_to_model(model, tok, *args)
    assert same_state(before, state(model))                       # no new slot left behind
    assert record == adaptor_record(model)
    assert torch.equal(ref, logits(model, tok, texts))
    if mode == "first edit":
        assert find_adaptor(model) is None
    else:
        assert find_adaptor(model).open_slot is not None          # still open, as before
    monkeypatch.undo()
    apply_lemoe_to_model(model, tok, reqs[1:2], hp)               # and editing still works
    assert find_edit(model, reqs[1]["prompt"]) is not None


def test_overflowing_optimizer_step_restores_the_model(tiny_models):
    """lr=1e38 makes AdamW's step overflow (RuntimeError inside torch): any failure, not
    only a non-finite loss, leaves the model as it was."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    before = state(model)
    with pytest.raises(RuntimeError):
        apply_lemoe_to_model(model, tok, fact_requests(3), hp_for(path, lr=1e38, max_steps=3))
    assert find_adaptor(model) is None and same_state(before, state(model))
