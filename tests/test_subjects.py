"""The subject router (``router: subject``): matching, carrying, editing, saving."""

import dataclasses

import pytest
import torch

from conftest import fact_requests, load_model
from lemoe_easyedit import (LEMoEHyperParams, apply_lemoe_to_model, find_adaptor, load_edits,
                            save_edits)
from lemoe_easyedit.subjects import (SubjectIndex, carry, subject_key, subject_rows,
                                     subject_token_forms)


def subject_hp(path, **kw):
    hp = LEMoEHyperParams.from_hparams("tiny-llama")
    kw = {"router": "subject", "locality_guard": False, "edits_per_expert": 2,
          "max_steps": 60, "order_planning": False, **kw}
    return dataclasses.replace(hp, model_name=str(path), **kw)


class Cache:
    """A KV cache as the routing reads it: only its length."""

    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


def forms(*rows_and_keys):
    """``(rows, keys)`` of a slot from ``(form, key)`` pairs."""
    width = max(len(f) for f, _ in rows_and_keys)
    rows = torch.tensor([f + [-1] * (width - len(f)) for f, _ in rows_and_keys])
    return rows, torch.tensor([k for _, k in rows_and_keys])


def test_matches_find_each_subject_where_it_ends_the_longest_first():
    index = SubjectIndex([forms(([5, 6], 10), ([7], 11)), None, forms(([6], 12)),
                          forms(([5, 6], 10))], "cpu")
    ids = torch.tensor([[1, 5, 6, 2, 7, 6, -1]])
    # [5, 6] (subject 10, in two slots) ends at 2, where [6] (12) is shorter; [7] (11) at 4;
    # [6] alone at 5; -1 (padding) never matches.
    assert index.matches(ids, 0).tolist() == [[-1, -1, 10, -1, 11, 12, -1]]
    # Only the last 3 positions asked for; a subject may begin in the part before them.
    assert index.matches(ids, 4).tolist() == [[11, 12, -1]]
    assert index.matches(torch.tensor([[9, 5]]), 1).tolist() == [[-1]]


def test_a_hash_collision_never_routes():
    index = SubjectIndex([forms(([5, 6], 3))], "cpu")
    n, hashes, rows, keys = index.tables[0]
    index.tables[0] = (n, hashes, torch.tensor([[5, 7]]), keys)  # same hash, other ids
    assert index.matches(torch.tensor([[5, 6]]), 0).tolist() == [[-1, -1]]


def test_carry_keeps_the_last_subject_to_the_end_and_across_calls():
    found = torch.tensor([[-1, 2, -1, -1, 4, -1], [-1, -1, -1, -1, -1, -1]])
    assert carry(found, None).tolist() == [[-1, 2, 2, 2, 4, 4], [-1] * 6]
    assert carry(found, torch.tensor([1, 3])).tolist() == [[1, 2, 2, 2, 4, 4], [3] * 6]


def test_subject_forms_cover_start_of_text_after_a_space_and_inside_the_prompt(tiny_models):
    _, tok = load_model(tiny_models("gpt2"))   # byte-level BPE: "Ann" and " Ann" are other tokens
    req = {"prompt": "Where was Alice Smith born", "target_new": "Rome",
           "subject": "Alice Smith"}
    forms = subject_token_forms(tok, req)
    assert tok("Alice Smith")["input_ids"] in forms
    assert tok(" Alice Smith")["input_ids"] in forms
    rows, keys = subject_rows(tok, [req, dict(req, subject="Smith")])
    assert rows.dtype == keys.dtype == torch.long and len(rows) == len(keys)
    assert set(keys.tolist()) == {subject_key("Alice Smith"), subject_key("Smith")}
    assert subject_key("Alice Smith") >= 0
    with pytest.raises(ValueError, match="subject"):
        subject_token_forms(tok, {"prompt": "x", "target_new": "y"})


def test_subject_forms_cover_a_last_token_merged_with_punctuation():
    # The realfact BPE keeps punctuation in words: with "Royer's" frequent it spells the
    # subject's last token "▁Royer's" there; the subject must be found in such a text, once.
    from lemoe_easyedit.realfact.tokenizer import build_tokenizer
    names = ["Ann", "Bob", "Carl", "Dora", "Eve", "Finn", "Gus", "Hal", "Ida", "Jo", "Kai"]
    texts = [f"{n} {s}'s team is {w}" for n in names for s in ("Royer", "Rover")
             for w in ("big", "small", "red")] + ["Daniel Royer plays", "Daniel Royer, who plays"]
    tok = build_tokenizer(texts, vocab_size=330)
    req = {"prompt": "Daniel Royer plays", "target_new": "chess", "subject": "Daniel Royer"}
    index = SubjectIndex([subject_rows(tok, [req])], "cpu")
    key = subject_key("Daniel Royer")
    for text in ("Daniel Royer's team is", "Yes. Daniel Royer, who plays", "Daniel Royer plays"):
        enc = tok(text, return_offsets_mapping=True)
        end = text.index("Royer") + len("Royer")
        last = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end)
        found = index.matches(torch.tensor([enc["input_ids"]]), 0)[0].tolist()
        assert found[last] == key and found.count(key) == 1, (text, found)
    assert "▁Royer's" in tok.tokenize("Daniel Royer's team is")  # what makes the case hard


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_subject_router_serves_paraphrases_and_leaves_other_subjects_alone(tiny_models,
                                                                             family):
    path = tiny_models(family)
    model, tok = load_model(path)
    reqs = fact_requests(6)
    apply_lemoe_to_model(model, tok, reqs, subject_hp(path))
    layer = find_adaptor(model)
    subjects = {r["subject"] for r in reqs}
    for r in reqs:
        # The edit's subject in words the editor never saw: routed from the subject on.
        text = f"Everyone asks where {r['subject']} grew up, and"
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
        route = layer.last_routes.expert[0, :, 0]
        owner = next(i for i, s in enumerate(layer.slots)
                     if r["prompt"] in [e["prompt"] for e in s.edits])
        assert route[-1].item() == owner
        assert route[0].item() == -1
    with torch.no_grad():
        model(**tok("Nobody asks where the mayor grew up, and", return_tensors="pt"))
    assert (layer.last_routes.expert == -1).all(), "a text without an edited subject"
    assert all(s not in "Nobody asks where the mayor grew up" for s in subjects)


def test_subject_router_edits_persist_through_save_and_load(tiny_models, tmp_path):
    path = tiny_models("llama")
    model, tok = load_model(path)
    reqs = fact_requests(4)
    apply_lemoe_to_model(model, tok, reqs, subject_hp(path))
    save_edits(model, tmp_path / "edits")
    fresh, _ = load_model(path)
    load_edits(fresh, tmp_path / "edits")
    x = tok([f"They say {r['subject']} was born in the city of" for r in reqs],
            return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**x).logits, fresh(**x).logits
    assert torch.equal(find_adaptor(model).last_routes.expert,
                       find_adaptor(fresh).last_routes.expert)
    torch.testing.assert_close(a, b)
    for s, t in zip(find_adaptor(model).slots, find_adaptor(fresh).slots):
        assert torch.equal(s.subject_ids, t.subject_ids)


def test_subject_router_rejects_what_it_cannot_route(tiny_models):
    path = tiny_models("llama")
    model, tok = load_model(path)
    req = dict(fact_requests(1)[0])
    req.pop("subject")
    with pytest.raises(ValueError, match="request 0: field 'subject'"):
        apply_lemoe_to_model(model, tok, [req], subject_hp(path))
    assert find_adaptor(model) is None or not len(find_adaptor(model).slots)
    with pytest.raises(ValueError, match="top_k"):
        subject_hp(path, top_k=2)
    apply_lemoe_to_model(model, tok, fact_requests(2), subject_hp(path))
    embeds = model.get_input_embeddings()(tok("Alice", return_tensors="pt")["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=embeds)


def test_edits_of_one_subject_in_several_experts_each_keep_their_own(tiny_models):
    """One person's two facts in two experts: the subject finds both, the anchors choose."""
    from conftest import rel

    path = tiny_models("llama")
    model, tok = load_model(path)
    born, other = fact_requests(2)
    lives = {"prompt": f"The city where {born['subject']} lives is",
             "target_new": other["target_new"], "subject": born["subject"]}
    reqs = [born, lives]
    apply_lemoe_to_model(model, tok, reqs, subject_hp(path, edits_per_expert=1))
    layer = find_adaptor(model)
    assert len(layer.slots) == 2
    for slot, r in enumerate(reqs):
        with torch.no_grad():
            model(**tok(r["prompt"], return_tensors="pt"))
        assert layer.last_routes.expert[0, -1, 0].item() == slot
    assert rel(model, tok, reqs) == 1.0


@pytest.mark.parametrize("pool,track", [("prefix_mean", False), ("ffn_input", True)])
def test_a_cache_the_routing_did_not_see_is_refused(pool, track):
    """The prefix sums and the subject ids continue a KV-cached sequence only when the cache
    holds exactly the positions the routing saw (beam search reorders it)."""
    from lemoe_easyedit.routing import QueryBuilder

    queries = QueryBuilder(torch.nn.Embedding(10, 4), pool, track_ids=track)
    model = torch.nn.Module()
    queries(model, (), {"input_ids": torch.tensor([[1, 2, 3]])})
    queries(model, (), {"input_ids": torch.tensor([[4]]), "cache": Cache(3)})   # continues
    with pytest.raises(RuntimeError, match="does not match the KV cache"):
        queries(model, (), {"input_ids": torch.tensor([[5]]), "cache": Cache(2)})
    with pytest.raises(RuntimeError, match="does not match the KV cache"):   # batch changed
        queries(model, (), {"input_ids": torch.tensor([[5], [6]]), "cache": Cache(4)})


def test_the_guard_carries_along_a_subject_run_and_across_cache_steps():
    """``guard_carries``: a position is served when an earlier position of its subject's
    run passed the guard; a new subject starts a new run; a KV-cache step continues the
    run of the last position."""
    from lemoe_easyedit.routing import QueryBuilder

    index = SubjectIndex([forms(([5], 1)), forms(([7], 2))], "cpu")
    queries = QueryBuilder(torch.nn.Embedding(10, 4), "ffn_input", track_ids=True)
    model = torch.nn.Module()
    queries(model, (), {"input_ids": torch.tensor([[3, 5, 3, 3, 7, 3]])})
    assert queries.current_subjects(index, torch.device("cpu")).tolist() == \
        [[-1, 1, 1, 1, 2, 2]]
    passed = torch.tensor([[False, False, True, False, False, False]])
    # Subject 1's run passes at 2 and stays admitted; subject 2's run (from 4) never passed.
    assert queries.admitted_runs(passed).tolist() == [[False, False, True, True, False, False]]
    # The next step continues subject 2's run, which passes now and carries on after.
    queries(model, (), {"input_ids": torch.tensor([[3]]), "cache": Cache(6)})
    queries.current_subjects(index, torch.device("cpu"))
    assert queries.admitted_runs(torch.tensor([[True]])).tolist() == [[True]]
    queries(model, (), {"input_ids": torch.tensor([[3, 5]]), "cache": Cache(7)})
    assert queries.current_subjects(index, torch.device("cpu")).tolist() == [[2, 1]]
    # Position 0 is still subject 2's admitted run; subject 1 starts a new run at 1.
    assert queries.admitted_runs(torch.tensor([[False, False]])).tolist() == [[True, False]]
    # A new sequence forgets what was admitted.
    queries(model, (), {"input_ids": torch.tensor([[7, 3]])})
    queries.current_subjects(index, torch.device("cpu"))
    assert queries.admitted_runs(torch.tensor([[False, False]])).tolist() == [[False, False]]


def test_a_carried_guard_serves_a_cached_generation_as_full_forwards_do(tiny_models):
    """With ``guard_carries`` the routes of a KV-cached greedy generation equal those of one
    full forward over the same tokens: the admission carried between steps is the state a
    full forward computes."""
    path = tiny_models("llama")
    model, tok = load_model(path)
    reqs = fact_requests(4)
    hp = subject_hp(path, edits_per_expert=1, locality_guard=True, guard_carries=True,
                    query_pool="ffn_input", guard_threshold=0.5)
    apply_lemoe_to_model(model, tok, reqs, hp)
    layer = find_adaptor(model)
    steps = []
    handle = layer.register_forward_hook(
        lambda m, a, o: steps.append(m.last_routes.expert[0, -1, 0].item()))
    served = 0
    try:
        for r in reqs:
            enc = tok(r["prompt"], return_tensors="pt")
            steps.clear()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=6, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            cached = steps[:out.shape[1] - enc.input_ids.shape[1]]
            with torch.no_grad():
                model(out)
            n = enc.input_ids.shape[1]
            full = layer.last_routes.expert[0, n - 1:out.shape[1] - 1, 0].tolist()
            assert cached == full
            served += sum(e >= 0 for e in full)
    finally:
        handle.remove()
    assert served > 0, "nothing was served: the test would not see the carried state"


def test_guard_carries_is_checked_and_older_saves_load_without_it(tiny_models, tmp_path):
    import json

    path = tiny_models("llama")
    with pytest.raises(ValueError, match="guard_carries.*router 'subject'"):
        subject_hp(path, router="anchor", guard_carries=True)
    with pytest.raises(ValueError, match="guard_carries"):
        subject_hp(path, guard_carries="yes")
    model, tok = load_model(path)
    apply_lemoe_to_model(model, tok, fact_requests(2),
                         subject_hp(path, locality_guard=True, guard_carries=True))
    save_edits(model, tmp_path / "edits")
    manifest = tmp_path / "edits" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["hparams"]["guard_carries"] is True
    del data["hparams"]["guard_carries"]  # a save written before the field existed
    manifest.write_text(json.dumps(data))
    fresh, _ = load_model(path)
    load_edits(fresh, tmp_path / "edits")
    assert find_adaptor(fresh).hparams.guard_carries is False
