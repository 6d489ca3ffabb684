"""Edits that last: save/load (exact), refused loads, no EasyEdit, atomic saves, rollback,
find_edit and remove_edit, on tiny local models."""

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import UNRELATED, fact_requests, load_model
from lemoe_easyedit import (EditsFileError, LEMoEHyperParams, apply_lemoe_to_model, find_adaptor,
                            find_edit, load_edits, remove_edit, rollback, save_edits)
from lemoe_easyedit.persistence import MANIFEST, SAVE_HOOK_ENV, TENSORS
from lemoe_easyedit.training import collate, encode_edits

REPO = Path(__file__).resolve().parent.parent
YAML = {"llama": "tiny-llama", "gpt2": "tiny-gpt2"}


def hp_for(path, family="llama", **kw):
    hp = LEMoEHyperParams.from_hparams(YAML[family])
    base = dict(model_name=str(path), edits_per_expert=3, max_steps=40)
    base.update(kw)
    return dataclasses.replace(hp, **base)


def texts_for(reqs):
    return ([r["prompt"] + " " + r["target_new"] for r in reqs]
            + [r["rephrase_prompt"] for r in reqs[:3]] + UNRELATED[:3])


def logits(model, tok, texts):
    out = []
    for side in ("right", "left"):
        tok.padding_side = side
        x = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out.append(model(**x).logits * x["attention_mask"].unsqueeze(-1))
    tok.padding_side = "right"
    return torch.cat(out)


def per_edit_logits(model, tok, texts):
    """Logits of each text alone: comparable however the routes of other texts change."""
    res = []
    for t in texts:
        x = tok([t], return_tensors="pt")
        with torch.no_grad():
            res.append(model(**x).logits[0])
    return res


def produced(model, tok, req):
    """Whether the model predicts every target token of ``req`` (teacher forced)."""
    e = encode_edits(tok, [req], 40)
    b = collate(e, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lg = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    m = b.labels[:, 1:] != -100
    return bool((lg[:, :-1].argmax(-1)[m] == b.labels[:, 1:][m]).all())


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- save / load ------------------------------------------------------------------------

@pytest.mark.parametrize("family,pool", [("llama", "prefix_mean"), ("gpt2", "prefix_mean"),
                                         ("llama", "ffn_input")])
@pytest.mark.parametrize("mode", ["batch", "online"])
def test_load_reproduces_logits_exactly_and_editing_continues(tiny_models, tmp_path, family,
                                                              pool, mode):
    path = tiny_models(family)
    model, tok = load_model(path)
    hp = dataclasses.replace(hp_for(path, family), query_pool=pool)
    reqs = fact_requests(8)
    if mode == "batch":
        apply_lemoe_to_model(model, tok, reqs[:6], hp)
        apply_lemoe_to_model(model, tok, reqs[6:7], hp)      # one online edit: an open slot
    else:
        for r in reqs[:4]:
            apply_lemoe_to_model(model, tok, [r], hp)
    layer = find_adaptor(model)
    assert layer.open_slot is not None
    texts = texts_for(reqs)
    ref = logits(model, tok, texts)
    save_edits(model, tmp_path / "edits")
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == [TENSORS, MANIFEST]

    fresh, _ = load_model(path)
    assert load_edits(fresh, tmp_path / "edits") is fresh   # PEFT's convention: the model
    loaded = find_adaptor(fresh)
    assert torch.equal(ref, logits(fresh, tok, texts))
    assert len(loaded.slots) == len(layer.slots)
    assert [s.frozen for s in loaded.slots] == [s.frozen for s in layer.slots]
    assert [s.edits for s in loaded.slots] == [s.edits for s in layer.slots]
    assert loaded.history == json.loads(json.dumps(layer.history))
    assert loaded.open_slot is not None                    # the open expert stays open
    assert all(p.requires_grad for p in loaded.open_slot.trainable_parameters())
    assert all(not p.requires_grad for s in loaded.slots[:-1] for p in s.parameters())

    # Editing goes on identically on the original and on the loaded model.
    for m in (model, fresh):
        apply_lemoe_to_model(m, tok, [reqs[7]], hp)
    assert len(find_adaptor(fresh).slots) == len(layer.slots)
    assert find_adaptor(fresh).slots[-1].edits == layer.slots[-1].edits
    assert torch.equal(logits(model, tok, texts), logits(fresh, tok, texts))


def test_load_reads_no_pickle(tiny_models, tmp_path, monkeypatch):
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(3), hp_for(path, max_steps=5))
    save_edits(model, tmp_path / "e")
    fresh, _ = load_model(path)

    def banned(*a, **k):
        raise AssertionError("load_edits must not unpickle")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                      (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, banned)
    load_edits(fresh, tmp_path / "e")
    assert torch.equal(logits(model, tok, UNRELATED[:2] + ["Alice Smith was born"]),
                       logits(fresh, tok, UNRELATED[:2] + ["Alice Smith was born"]))


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """One save of a tiny llama edited in two experts, to corrupt copies of."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(6), hp_for(path, max_steps=5))
    out = tmp_path_factory.mktemp("saved") / "edits"
    save_edits(model, out)
    return path, out


def _manifest(d):
    return json.loads((d / MANIFEST).read_text())


def _write_manifest(d, m):
    (d / MANIFEST).write_text(json.dumps(m))


def _rewrite_tensors(d, change):
    """Rewrite the tensor file with ``change(tensors)`` and make the manifest agree."""
    tensors = load_file(str(d / TENSORS))
    change(tensors)
    save_file(tensors, str(d / TENSORS))
    m = _manifest(d)
    import hashlib
    m["tensors"]["bytes"] = (d / TENSORS).stat().st_size
    m["tensors"]["sha256"] = hashlib.sha256((d / TENSORS).read_bytes()).hexdigest()
    for i, s in enumerate(m["slots"]):
        for name, info in s["tensors"].items():
            t = tensors[f"slots.{i}.{name}"]
            info["shape"] = list(t.shape)
    _write_manifest(d, m)


def _truncate(f, keep=0.5):
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])


def _flip_last_byte(f):
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _slot0(m):
    return m["slots"][0]["tensors"]


CORRUPTIONS = {
    "missing manifest": (lambda d: (d / MANIFEST).unlink(), "manifest.json: missing"),
    "missing tensors": (lambda d: (d / TENSORS).unlink(), "adaptor.safetensors: missing"),
    "truncated tensors": (lambda d: _truncate(d / TENSORS), "truncated or replaced"),
    "truncated manifest": (lambda d: _truncate(d / MANIFEST), "not valid JSON"),
    "corrupted tensor bytes": (lambda d: _flip_last_byte(d / TENSORS), "SHA-256 differs"),
    "wrong format version": (
        lambda d: _write_manifest(d, dict(_manifest(d), format_version=99)),
        "'format_version' is 99"),
    "not an edits manifest": (
        lambda d: _write_manifest(d, dict(_manifest(d), format="something")), "'format'"),
    "manifest lacks a tensor": (
        lambda d: _write_manifest(d, _drop_manifest_tensor(_manifest(d))),
        "in the file are not in the manifest: slots.0.routing.key"),
    "manifest lists an extra tensor": (
        lambda d: _write_manifest(d, _add_manifest_tensor(_manifest(d))),
        "missing from the file: slots.0.extra"),
    "manifest shape disagrees": (
        lambda d: _write_manifest(d, _reshape_manifest_tensor(_manifest(d))),
        "'slots.0.routing.key' is F32\\[16\\] in the file but F32\\[17\\] in the manifest"),
    "tensor shape does not fit the model": (
        lambda d: _rewrite_tensors(d, lambda t: t.update(
            {"slots.0.expert.w_out.weight": torch.zeros(32, 65)})),
        "slot 0 tensor 'expert.w_out.weight' is torch.float32\\[32, 65\\], this model needs"),
    "slot missing an expert tensor": (
        lambda d: _write_manifest(d, _pop_slot_tensor(_manifest(d), 1, "expert.w_gate.weight"))
        or _rewrite_tensors(d, lambda t: t.pop("slots.1.expert.w_gate.weight")),
        "slot 1 does not fit this model's ffn expert"),
    "bad hparams": (
        lambda d: _write_manifest(d, _set_hp(_manifest(d), "router", "hash")), "hparams.router"),
    "open slot not last": (
        lambda d: _write_manifest(d, _open_first(_manifest(d))), "slots\\[0\\].frozen"),
}


def _drop_manifest_tensor(m):
    del _slot0(m)["routing.key"]
    return m


def _add_manifest_tensor(m):
    _slot0(m)["extra"] = {"dtype": "F32", "shape": [1]}
    return m


def _reshape_manifest_tensor(m):
    _slot0(m)["routing.key"]["shape"] = [17]
    return m


def _pop_slot_tensor(m, i, name):
    del m["slots"][i]["tensors"][name]
    return m


def _set_hp(m, key, value):
    m["hparams"][key] = value
    return m


def _open_first(m):
    m["slots"][0]["frozen"] = False
    return m


def _model_signature(model):
    return (state(model), [n for n, _ in model.named_modules()], len(model._forward_pre_hooks))


def _assert_untouched(model, before):
    after = _model_signature(model)
    assert same_state(before[0], after[0])
    assert before[1:] == after[1:]
    assert find_adaptor(model) is None


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_save_is_refused_and_model_untouched(saved, tmp_path, case):
    path, src = saved
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    corrupt, needle = CORRUPTIONS[case]
    corrupt(d)
    model, _ = load_model(path)
    before = _model_signature(model)
    rng = torch.random.get_rng_state()
    with pytest.raises(EditsFileError, match=needle):
        load_edits(model, d)
    _assert_untouched(model, before)
    assert torch.equal(rng, torch.random.get_rng_state())


def _other_llama(tok, **kw):
    from lemoe_easyedit.testing import tiny_config
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), **kw)).eval()


@pytest.mark.parametrize("which,needle", [
    ("host weights", "'base_model.host_ffn_sha256'"),
    ("embeddings", "'base_model.input_embeddings_sha256'"),
    ("model type", "'base_model.model_type' is 'llama' but this model's is 'gpt2'"),
    ("hidden size", "'base_model.hidden_size' is 32 but this model's is 48"),
    ("layer count", "'base_model.num_layers' is 4 but this model's is 3"),
    ("no directory", "no such directory"),
])
def test_other_base_model_is_refused(saved, tiny_models, which, needle, tmp_path):
    path, src = saved
    model, tok = load_model(path)
    target = src
    if which == "host weights":
        with torch.no_grad():
            model.model.layers[2].mlp.up_proj.weight[0, 0] += 1e-3
    elif which == "embeddings":
        with torch.no_grad():
            model.model.embed_tokens.weight[5, 0] += 1e-3
    elif which == "model type":
        model, _ = load_model(tiny_models("gpt2"))
    elif which == "hidden size":
        model = _other_llama(tok, hidden=48)
    elif which == "layer count":
        model = _other_llama(tok, layers=3)
    else:
        target = tmp_path / "nothing-here"
    before = _model_signature(model)
    with pytest.raises(EditsFileError, match=needle):
        load_edits(model, target)
    _assert_untouched(model, before)


def test_load_into_an_edited_model_needs_replace(saved, tmp_path):
    path, src = saved
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(1), hp_for(path, max_steps=3))
    before = state(model)
    with pytest.raises(ValueError, match="already has a LEMoE adaptor"):
        load_edits(model, src)
    assert same_state(before, state(model))
    fresh, _ = load_model(path)
    load_edits(fresh, src)
    assert load_edits(model, src, replace=True) is model
    assert len(find_adaptor(model).slots) == 2
    assert torch.equal(logits(model, tok, UNRELATED[:2]), logits(fresh, tok, UNRELATED[:2]))
    assert len(model._forward_pre_hooks) == len(fresh._forward_pre_hooks)


def test_save_refuses_foreign_directory_and_unedited_model(saved, tmp_path):
    path, _ = saved
    model, tok = load_model(path)
    with pytest.raises(ValueError, match="no LEMoE adaptor"):
        save_edits(model, tmp_path / "x")
    apply_lemoe_to_model(model, tok, fact_requests(1), hp_for(path, max_steps=3))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_edits(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# -- without EasyEdit -------------------------------------------------------------------

NO_EASYEDIT = r'''
import sys
sys.modules["easyeditor"] = None          # EasyEdit is not importable in this process
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import lemoe_easyedit
for name in ("LEMoEHyperParams", "apply_lemoe_to_model"):
    try:
        exec(f"from lemoe_easyedit import {name}")
    except ImportError as exc:
        assert "pip install --no-deps easyeditor==0.0.1.dev0" in str(exc), str(exc)
        print("IMPORT-ERROR", name, exc)
    else:
        raise SystemExit(f"{name} imported without easyeditor")
from lemoe_easyedit import find_adaptor, load_edits, rollback, find_edit
ref = load_file(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model = load_edits(model, sys.argv[2])
layer = find_adaptor(model)
assert type(layer.hparams).__name__ == "StoredHyperParams", type(layer.hparams)
with torch.no_grad():
    out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
assert torch.equal(out, ref["logits"]), "logits differ"
assert find_edit(model, 0).slot == 0
rollback(model, last=len(layer.slots))
with torch.no_grad():
    out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
assert torch.equal(out, ref["base"]), "rollback of every expert is not the base model"
assert sys.modules.get("easyeditor") is None
print("LOADED-OK")
'''


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def test_load_edits_works_without_easyeditor(tiny_models, tmp_path):
    path = tiny_models("llama")
    model, tok = load_model(path)
    x = tok(texts_for(fact_requests(4)), return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**x).logits
    apply_lemoe_to_model(model, tok, fact_requests(4), hp_for(path, max_steps=20))
    with torch.no_grad():
        ref = model(**x).logits
    save_edits(model, tmp_path / "edits")
    save_file({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"],
               "logits": ref, "base": base}, str(tmp_path / "ref.safetensors"))
    script = tmp_path / "no_easyedit.py"
    script.write_text(NO_EASYEDIT)
    res = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "edits"),
                          str(tmp_path / "ref.safetensors")], capture_output=True, text=True,
                         env=_env(), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("IMPORT-ERROR") == 2 and "LOADED-OK" in res.stdout


# -- atomic saves -----------------------------------------------------------------------

SAVER = r'''
import sys, torch
sys.modules["easyeditor"] = None          # faster start; saving needs no EasyEdit
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from lemoe_easyedit import load_edits, save_edits, rollback
model_path, old, new_save, loop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "loop"
a = AutoModelForCausalLM.from_pretrained(model_path).eval()
load_edits(a, old)
b = AutoModelForCausalLM.from_pretrained(model_path).eval()
load_edits(b, old)
rollback(b, last=1)                        # a different set of edits to save over the old
print("READY", flush=True)
i = 0
while True:
    save_edits(b if i % 2 == 0 else a, new_save)
    i += 1
    if not loop:
        break
'''


def _edited_save(tiny_models, tmp_path):
    path = tiny_models("llama")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(6), hp_for(path, max_steps=5))
    save_edits(model, tmp_path / "edits")
    texts = texts_for(fact_requests(6))
    ref_a = logits(model, tok, texts)
    rollback(model, last=1)
    ref_b = logits(model, tok, texts)
    assert not torch.equal(ref_a, ref_b)
    shutil.copytree(tmp_path / "edits", tmp_path / "pristine")
    return path, tok, texts, ref_a, ref_b


def _load_logits(path, tok, texts, d):
    m, _ = load_model(path)
    load_edits(m, d)
    return logits(m, tok, texts)


def _spawn(script, args, **env):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**env))


def _wait_for(p, ready, what):
    deadline = time.time() + 180
    while not ready():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, f"the save never reached {what}"
        time.sleep(0.05)


def test_save_killed_mid_save_keeps_a_whole_save(tiny_models, tmp_path):
    """SIGKILL a saving process at each stage (test hook) and at a random moment of a save
    loop: the directory always loads, to the previous save or (loop) to a complete one."""
    path, tok, texts, ref_a, ref_b = _edited_save(tiny_models, tmp_path)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    stages = {"written": {}, "aside": {"LEMOE_EDITS_NO_EXCHANGE": "1"}}
    procs = {}
    try:
        for stage, extra in stages.items():      # each saves over its own copy of the save
            shutil.copytree(tmp_path / "pristine", tmp_path / stage)
            procs[stage] = _spawn(script, [path, tmp_path / "pristine", tmp_path / stage, "once"],
                                  **{SAVE_HOOK_ENV: f"{stage}:{tmp_path / ('at-' + stage)}",
                                     **extra})
        shutil.copytree(tmp_path / "pristine", tmp_path / "loop")
        procs["loop"] = loop = _spawn(script, [path, tmp_path / "pristine", tmp_path / "loop",
                                               "loop"])
        for stage in stages:
            p = procs[stage]
            _wait_for(p, (tmp_path / f"at-{stage}").exists, stage)
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert loop.stdout.readline().strip() == "READY", loop.communicate()
        time.sleep(0.5)                          # many saves of either set of edits by now
        loop.send_signal(signal.SIGKILL)
        loop.wait()
    finally:
        for p in procs.values():                 # never leave a sleeping saver behind
            if p.poll() is None:
                p.kill()
                p.wait()

    for stage in stages:
        d = tmp_path / stage
        if stage == "aside":
            assert not d.exists()               # killed between the two renames...
            with pytest.warns(RuntimeWarning, match="interrupted"):
                got = _load_logits(path, tok, texts, d)
        else:
            got = _load_logits(path, tok, texts, d)
        assert torch.equal(got, ref_a), stage    # ...the previous save still loads, intact
    got = _load_logits(path, tok, texts, tmp_path / "loop")
    assert torch.equal(got, ref_a) or torch.equal(got, ref_b)

    # The next save cleans up what the killed ones left and replaces the previous save.
    model, _ = load_model(path)
    load_edits(model, tmp_path / "pristine")
    rollback(model, last=1)
    for stage in [*stages, "loop"]:
        save_edits(model, tmp_path / stage)
        assert torch.equal(_load_logits(path, tok, texts, tmp_path / stage), ref_b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- rollback, find_edit, remove_edit -------------------------------------------------

def test_rollback_of_newest_experts_restores_exact_logits(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path)
    reqs = fact_requests(10)
    texts = texts_for(reqs)
    snaps = [logits(model, tok, texts)]
    apply_lemoe_to_model(model, tok, reqs[:6], hp)      # experts 0, 1
    snaps.append(logits(model, tok, texts))
    apply_lemoe_to_model(model, tok, reqs[6:9], hp)     # expert 2
    snaps.append(logits(model, tok, texts))
    apply_lemoe_to_model(model, tok, reqs[9:10], hp)    # expert 3, open
    assert len(find_adaptor(model).slots) == 4
    assert find_edit(model, reqs[9]["prompt"]).slot == 3
    removed = rollback(model, batch=-1)
    assert [e["prompt"] for e in removed] == [reqs[9]["prompt"]]
    assert torch.equal(logits(model, tok, texts), snaps[2])
    assert find_edit(model, reqs[9]["prompt"]) is None
    assert find_adaptor(model).open_slot is None
    rollback(model, last=1)
    assert torch.equal(logits(model, tok, texts), snaps[1])
    rollback(model, last=2)
    assert torch.equal(logits(model, tok, texts), snaps[0])
    with pytest.raises(ValueError, match="last must be an integer in \\[1, 0\\]"):
        rollback(model, last=1)


@pytest.mark.parametrize("router", ["anchor", "learned"])
def test_rollback_of_a_middle_expert(tiny_models, router):
    """Inputs never routed to the removed expert keep their exact logits; its edits are gone."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    reqs = fact_requests(9)
    apply_lemoe_to_model(model, tok, reqs, hp_for(path, router=router, order_planning=False))
    layer = find_adaptor(model)
    assert len(layer.slots) == 3 and all(produced(model, tok, r) for r in reqs)
    texts = texts_for(reqs)
    before = per_edit_logits(model, tok, texts)
    touched = []
    for t in texts:
        with torch.no_grad():
            model(**tok([t], return_tensors="pt"))
        touched.append(bool((layer.last_routes.expert == 1).any()))
    with pytest.raises(ValueError, match="out of range"):
        rollback(model, batch=3)
    removed = rollback(model, batch=1)
    assert sorted(e["edit_id"] for e in removed) == [3, 4, 5]
    after = per_edit_logits(model, tok, texts)
    untouched = [i for i, hit in enumerate(touched) if not hit]
    assert len(untouched) >= 6
    assert all(torch.equal(before[i], after[i]) for i in untouched)
    assert all(produced(model, tok, r) for r in reqs[:3] + reqs[6:])
    assert not any(produced(model, tok, r) for r in reqs[3:6])
    assert all(find_edit(model, r["prompt"]) is None for r in reqs[3:6])
    assert find_edit(model, reqs[7]["prompt"]).slot == 1        # slot 2 moved down


def test_find_edit(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    reqs = fact_requests(4)
    apply_lemoe_to_model(model, tok, reqs[:3], hp_for(path, max_steps=3))
    apply_lemoe_to_model(model, tok, [dict(reqs[0], target_new="Rome")], hp_for(path, max_steps=3))
    loc = find_edit(model, reqs[0]["prompt"])
    assert (loc.slot, loc.edit_id, loc.target_new, loc.frozen) == (1, 3, "Rome", False)
    old = find_edit(model, 0)
    assert (old.slot, old.prompt) == (0, reqs[0]["prompt"]) and old.frozen
    assert find_edit(model, 99) is None and find_edit(model, "nobody") is None
    with pytest.raises(TypeError, match="edit_id \\(int\\) or its prompt \\(str\\)"):
        find_edit(model, 1.5)


@pytest.mark.parametrize("router", ["anchor", "learned"])
def test_remove_edit_retrains_its_expert_without_it(tiny_models, router, monkeypatch):
    path = tiny_models("llama")
    model, tok = load_model(path)
    reqs = fact_requests(9)
    hp = hp_for(path, router=router, order_planning=False, max_steps=60)
    apply_lemoe_to_model(model, tok, reqs, hp)
    layer = find_adaptor(model)
    assert all(produced(model, tok, r) for r in reqs)
    others = {i: state(layer.slots[i]) for i in (0, 2)}

    # A diverging retrain puts the expert back as it was.
    import lemoe_easyedit.training as training
    whole = state(model)
    with monkeypatch.context() as mp:
        mp.setattr(training, "_target_loss", lambda lg, lab: lg.sum() * float("nan"))
        with pytest.raises(FloatingPointError):
            remove_edit(model, tok, 4)
    assert same_state(whole, state(model))

    removed = remove_edit(model, tok, 4)                  # held by expert 1 with edits 3, 5
    assert [(e["edit_id"], e["slot"]) for e in removed] == [(4, 1)]
    assert [e["edit_id"] for e in layer.slots[1].edits] == [3, 5]
    assert layer.slots[1].frozen
    assert not produced(model, tok, reqs[4])
    assert all(produced(model, tok, r) for i, r in enumerate(reqs) if i != 4)
    for i, ref in others.items():                         # other experts untouched
        assert same_state(ref, state(layer.slots[i]))
    assert find_edit(model, 4) is None
    with pytest.raises(KeyError, match="edit_id 4"):
        remove_edit(model, tok, 4)
    # By prompt; an expert left empty is removed.
    for i in (3, 5):
        remove_edit(model, tok, reqs[i]["prompt"])
    assert len(layer.slots) == 2
    assert all(produced(model, tok, r) for r in reqs[:3] + reqs[6:])


def test_acceptance_radii_are_saved_and_a_save_without_them_still_loads(tiny_models, tmp_path):
    import hashlib

    path = tiny_models("llama")
    model, tok = load_model(path)
    hp = hp_for(path, query_pool="ffn_input", router="anchor", negatives_per_edit=2)
    apply_lemoe_to_model(model, tok, fact_requests(6), hp)
    radii = [s.radius.clone() for s in find_adaptor(model).slots]
    assert all(len(r) == len(s.anchors) for r, s in zip(radii, find_adaptor(model).slots))
    assert any(bool((r > -1).any()) for r in radii)   # fitted, not left empty
    save_edits(model, tmp_path / "edits")
    loaded = find_adaptor(load_edits(load_model(path)[0], tmp_path / "edits"))
    assert all(torch.equal(a, s.radius) for a, s in zip(radii, loaded.slots))

    # A save from before anchors had radii (format 1 without the tensor) loads, radius-less.
    tensors = load_file(str(tmp_path / "edits" / TENSORS))
    manifest = json.loads((tmp_path / "edits" / MANIFEST).read_text())
    for i, info in enumerate(manifest["slots"]):
        tensors.pop(f"slots.{i}.radius")
        info["tensors"].pop("radius")
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, str(old / TENSORS))
    blob = (old / TENSORS).read_bytes()
    manifest["tensors"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (old / MANIFEST).write_text(json.dumps(manifest))
    older = find_adaptor(load_edits(load_model(path)[0], old))
    assert all(len(s.radius) == 0 for s in older.slots)
    # A radius of the wrong length is refused by name.
    tensors["slots.0.radius"] = torch.zeros(len(tensors["slots.0.anchors"]) + 1)
    manifest["slots"][0]["tensors"]["radius"] = {
        "dtype": manifest["slots"][0]["tensors"]["anchors"]["dtype"],
        "shape": [len(tensors["slots.0.radius"])]}
    save_file(tensors, str(old / TENSORS))
    blob = (old / TENSORS).read_bytes()
    manifest["tensors"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EditsFileError, match="radius"):
        load_edits(load_model(path)[0], old)
