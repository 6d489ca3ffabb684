"""Loaders: the shared benchmark files, ROME's nested CounterFact, malformed records."""

import json
import warnings
from pathlib import Path

import pytest

from lemoe_easyedit.evaluation import data
from lemoe_easyedit.evaluation.data import MalformedRecordError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"shared benchmark data not found at {SHARED}")

REQUEST_KEYS = {"case_id", "prompt", "target_new", "ground_truth", "subject", "locality",
                "portability"}


def check_requests(requests, rephrase=True):
    for r in requests:
        assert REQUEST_KEYS <= set(r), r
        assert r["prompt"].strip() and r["target_new"].strip()
        assert r["subject"] in r["prompt"]
        assert ("rephrase_prompt" in r) == rephrase or not rephrase
        for probe in r["locality"].values():
            assert probe["prompt"].strip() and probe["ground_truth"].strip()


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


# ----------------------------------------------------------------------- shared files


@needs_shared
@pytest.mark.parametrize("name,expected", [("counterfact-edit-1k.json", 1000),
                                           ("counterfact-edit.json", 10000),
                                           ("counterfact-train.json", 10000)])
def test_shared_counterfact_files_load(name, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file warns about nothing
        requests = data.load_dataset("counterfact", SHARED / "counterfact" / name)
    assert len(requests) == expected
    check_requests(requests)
    first = json.loads((SHARED / "counterfact" / name).read_text())[0]
    assert requests[0]["case_id"] == first["case_id"]
    assert requests[0]["locality"] == {"neighborhood": {
        "prompt": first["locality_prompt"], "ground_truth": first["locality_ground_truth"]}}


@needs_shared
def test_shared_zsre_file_reports_its_two_empty_targets():
    path = SHARED / "zsre" / "zsre_mend_train-1k.json"
    with pytest.raises(MalformedRecordError) as info:
        data.load_dataset("zsre", path)
    assert [(i, f) for i, f, _ in info.value.problems] == [(534, "alt"), (723, "alt")]
    assert "record 534: field 'alt' is empty" in str(info.value)
    with pytest.warns(UserWarning, match=r"skipped 2 malformed record\(s\) \[534, 723\]"):
        requests = data.load_dataset("zsre", path, skip_malformed=True)
    assert len(requests) == 998
    check_requests(requests)
    assert all(set(r["locality"]) == {"nq"} for r in requests)
    assert 534 not in {r["case_id"] for r in requests}


@needs_shared
def test_shared_zsre_agrees_with_easyeditors_zsre_dataset():
    """Same field mapping as EasyEdit's own ZsreDataset (which also skips empty alts)."""
    from easyeditor.dataset import ZsreDataset

    path = SHARED / "zsre" / "zsre_mend_train-1k.json"
    theirs = ZsreDataset(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = data.load_zsre(path, skip_malformed=True)
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs):
        assert mine["case_id"] == ref["case_id"]
        assert mine["prompt"] == ref["prompt"]
        assert mine["target_new"] == ref["target_new"]
        assert mine["ground_truth"] == ref["ground_truth"]
        assert mine["rephrase_prompt"] == ref["rephrase_prompt"]
        assert mine["locality"]["nq"] == {"prompt": ref["locality_prompt"],
                                          "ground_truth": ref["locality_ground_truth"]}


@needs_shared
@pytest.mark.parametrize("name,expected,empty_loc", [
    ("hallucination-edit.json", 600, [86, 90, 171, 172, 238, 314, 432]),
    ("hallucination-train.json", 306, [101, 148, 200, 251, 259])])
def test_shared_hallucination_files_load(name, expected, empty_loc):
    with pytest.warns(UserWarning, match="kept without an empty optional probe") as caught:
        requests = data.load_dataset("hallucination", SHARED / "hallucination" / name)
    assert len(requests) == expected
    check_requests(requests, rephrase=False)
    assert all("rephrase_prompt" not in r for r in requests)
    assert [r["case_id"] for r in requests if not r["locality"]] == empty_loc
    message = str(caught[0].message)
    assert all(f"record {i}: locality_ground_truth" in message for i in empty_loc)


# ----------------------------------------------------------------------- formats


ROME_RECORD = {
    "case_id": 7,
    "pararel_idx": 1,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks the language of"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}


def test_rome_counterfact_format(tmp_path):
    path = write(tmp_path, "counterfact.json", [ROME_RECORD])
    assert data.detect_format([ROME_RECORD]) == "counterfact-rome"
    (r,) = data.load_counterfact(path)
    assert r == {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is",
                 "target_new": "English", "ground_truth": "French",
                 "subject": "Danielle Darrieux",
                 "rephrase_prompt": "Shayna does this. Danielle Darrieux speaks the language of",
                 "locality": {"neighborhood": {"prompt": "Michel Rocard is a native speaker of",
                                               "ground_truth": "French"}},
                 "portability": {}}
    assert data.load_dataset("counterfact", path) == [r]


def test_zsre_mend_eval_and_wise_edit_shaped_files(tmp_path):
    """zsre_mend_eval.json / WISE's zsre_mend_edit.json share the MEND record format."""
    rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
           "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
           "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
           "loc": "nq question: who played desmond doss father in hacksaw ridge",
           "loc_ans": "Hugo Weaving",
           "cond": "Trinity College >> University of Michigan || What university did Watts "
                   "Humphrey attend?"}
    path = write(tmp_path, "zsre_mend_eval.json", [rec, dict(rec, loc="who wrote it")])
    out = data.load_dataset("zsre", path)
    assert out[0]["target_new"] == "University of Michigan"
    assert out[0]["ground_truth"] == "Illinois Institute of Technology"
    assert out[0]["locality"] == {"nq": {"prompt": rec["loc"], "ground_truth": "Hugo Weaving"}}
    assert out[1]["locality"]["nq"]["prompt"] == "who wrote it"  # no prefix required
    jsonl = tmp_path / "zsre.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [rec, rec]))
    assert len(data.load_records(jsonl, "zsre")) == 2


def test_requests_format_and_detection(tmp_path):
    req = {"prompt": "A is", "target_new": "B", "subject": "A",
           "locality": {"x": {"prompt": "C is", "ground_truth": "D"}}}
    path = write(tmp_path, "requests.json", [req])
    (r,) = data.load_records(path)
    assert r["ground_truth"] == data.NO_GROUND_TRUTH and r["case_id"] == 0
    assert r["locality"] == {"x": {"prompt": "C is", "ground_truth": "D"}}
    assert data.load_dataset("testbed", str(path)) == [r]
    with pytest.raises(ValueError, match="cannot tell the format"):
        data.detect_format([{"question": "?"}])
    with pytest.raises(ValueError, match="needs --data-path"):
        data.load_dataset("zsre", None)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("mquake", str(path))


# ----------------------------------------------------------------------- malformed


def test_malformed_records_are_named_by_index_and_field(tmp_path):
    good = {"case_id": 0, "prompt": "X plays", "subject": "X", "target_new": "chess",
            "ground_truth": "go", "rephrase_prompt": "X is good at",
            "locality_prompt": "Y plays", "locality_ground_truth": "go"}
    records = [
        good,
        dict(good, target_new=""),                    # 1: empty
        dict(good, prompt=42),                        # 2: wrong type
        {k: v for k, v in good.items() if k != "ground_truth"},   # 3: missing
        dict(good, subject="Z"),                      # 4: subject not in prompt
        "not a record",                               # 5: not an object
        dict(good, rephrase_prompt=""),               # 6: empty optional probe: kept
        good,
    ]
    path = write(tmp_path, "cf.json", records)
    with pytest.raises(MalformedRecordError) as info:
        data.load_counterfact(path)
    problems = [(i, f) for i, f, _ in info.value.problems]
    assert problems == [(1, "target_new"), (2, "prompt"), (3, "ground_truth"),
                        (4, "subject"), (5, "<record>")]
    text = str(info.value)
    assert "record 1: field 'target_new' is empty" in text
    assert "record 2: field 'prompt' must be a string, got int" in text
    assert "record 3: field 'ground_truth' is missing" in text
    assert "'Z' does not occur in the prompt" in text
    assert isinstance(info.value, ValueError)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = data.load_counterfact(path, skip_malformed=True)
    assert [r["case_id"] for r in out] == [0, 0, 0]
    assert [("rephrase_prompt" in r) for r in out] == [True, False, True]
    messages = [str(w.message) for w in caught]
    assert any("skipped 5 malformed record(s) [1, 2, 3, 4, 5]" in m for m in messages)
    assert any("record 6: rephrase_prompt" in m for m in messages)


def test_malformed_rome_and_zsre_fields(tmp_path):
    bad_rome = json.loads(json.dumps(ROME_RECORD))
    del bad_rome["requested_rewrite"]["target_new"]["str"]
    no_braces = json.loads(json.dumps(ROME_RECORD))
    no_braces["requested_rewrite"]["prompt"] = "The mother tongue is"
    path = write(tmp_path, "rome.json", [ROME_RECORD, bad_rome, no_braces])
    with pytest.raises(MalformedRecordError) as info:
        data.load_counterfact(path)
    assert [(i, f) for i, f, _ in info.value.problems] == [
        (1, "requested_rewrite.target_new.str"), (2, "requested_rewrite.prompt")]

    zsre = {"subject": "S", "src": "Where is S?", "rephrase": "S is where?", "alt": "Here",
            "answers": [], "loc": "nq question: q", "loc_ans": "a"}
    ok = dict(zsre, answers=["There"])
    path = write(tmp_path, "zsre.json", [zsre, dict(ok, answers="Here"), dict(ok, src=None)])
    with pytest.raises(MalformedRecordError) as info:
        data.load_zsre(path)
    assert [(i, f) for i, f, _ in info.value.problems] == [
        (0, "answers"), (1, "answers"), (2, "src")]


def test_not_a_list_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        data.load_records(path)
    with pytest.raises(FileNotFoundError):
        data.load_records(tmp_path / "missing.json")


# ----------------------------------------------------------------------- subject alignment


def _testbed_tokenizer():
    from transformers import AutoTokenizer

    from lemoe_easyedit import testbed

    return AutoTokenizer.from_pretrained(str(testbed.shipped_model_path()))


def test_subject_aligned_drops_exactly_what_easyedits_subject_index_gets_wrong():
    import lemoe_easyedit  # noqa: F401  (EasyEdit importable here)
    from easyeditor.models.rome.repr_tools import get_words_idxs_in_templates

    tok = _testbed_tokenizer()
    reqs = [{"prompt": p, "subject": s, "target_new": "x"} for p, s in [
        ("Who was the designor of Albert and Edith Adelman House?", "Albert and Edith "
         "Adelman House"),                                # merged with "?": misaligned
        ("Cadillac Escalade, produced by", "Cadillac Escalade"),   # merged with ","
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Kel Kelu lives in Borona", "Kel Kelu"),
        ("A prompt without it", "Nobody"),                 # subject missing: dropped
    ]]
    kept, dropped = data.subject_aligned(reqs, tok)
    assert dropped == [0, 1, 4]
    assert [r["prompt"] for r in kept] == [reqs[2]["prompt"], reqs[3]["prompt"]]
    for i, r in enumerate(reqs[:4]):
        template = r["prompt"].replace(r["subject"], "{}", 1)
        idx = get_words_idxs_in_templates(tok, [template], [r["subject"]], "last")[0][0]
        head = tok(r["prompt"][:r["prompt"].find(r["subject"]) + len(r["subject"])])
        right = idx == len(head["input_ids"]) - 1 and \
            tok(r["prompt"])["input_ids"][:idx + 1] == head["input_ids"]
        assert right == (i not in dropped), r["prompt"]


def test_runner_subject_aligned_flag_filters_and_records(tmp_path):
    from lemoe_easyedit.evaluation import runner

    records = [{"prompt": "Cadillac Escalade, produced by", "subject": "Cadillac Escalade",
                "target_new": "Honda", "ground_truth": "GM",
                "locality": {}, "portability": {}},
               {"prompt": "The mother tongue of Danielle Darrieux is",
                "subject": "Danielle Darrieux", "target_new": "English",
                "ground_truth": "French", "locality": {}, "portability": {}}]
    path = write(tmp_path, "reqs.json", records)
    args = runner.add_run_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--method", "LEMoE", "--hparams", "hparams/LEMoE/testbed-llama.yaml",
         "--data", "testbed", "--data-path", str(path), "--subject-aligned",
         "--out", str(tmp_path / "out")])
    hp = runner.prepare_hparams(args.method, args.hparams, args)
    with pytest.warns(UserWarning, match="left out 1 record"):
        kept, dropped = runner._subject_aligned(data.load_dataset("testbed", str(path)), hp)
    assert [r["subject"] for r in kept] == ["Danielle Darrieux"] and len(dropped) == 1
    assert "--subject-aligned" in runner._forwarded_flags(args)
