"""Same-subject locality probes built from the records (``evaluation.probes``)."""

import copy

from lemoe_easyedit.evaluation.probes import SAME_SUBJECT, with_same_subject_probes


def _req(subject, prompt, answer, rephrase=None, **locality):
    r = {"prompt": prompt, "subject": subject, "target_new": "X", "ground_truth": answer,
         "locality": {k: {"prompt": p, "ground_truth": a} for k, (p, a) in locality.items()}}
    if rephrase is not None:
        r["rephrase_prompt"] = rephrase
    return r


def test_each_subject_is_asked_the_next_different_question():
    reqs = [
        _req("Ada", "Ada was born in", "London", nq=("who wrote it", "Poe")),
        _req("Bob", "Bob was born in", "Paris"),      # same question as Ada's: passed over
        _req("Cy", "The employer of Cy is", "IBM"),
        _req("Di", "Di speaks", "Welsh"),
    ]
    before = copy.deepcopy(reqs)
    out, missing = with_same_subject_probes(reqs)
    assert missing == 0 and reqs == before  # the input is left as it was
    assert out[0]["locality"][SAME_SUBJECT] == {"prompt": "The employer of Ada is",
                                                "ground_truth": "IBM"}
    assert out[0]["locality"]["nq"] == {"prompt": "who wrote it", "ground_truth": "Poe"}
    assert out[1]["locality"][SAME_SUBJECT]["prompt"] == "The employer of Bob is"
    assert out[2]["locality"][SAME_SUBJECT] == {"prompt": "Cy speaks", "ground_truth": "Welsh"}
    # The last one wraps round to the first record's question.
    assert out[3]["locality"][SAME_SUBJECT] == {"prompt": "Di was born in",
                                                "ground_truth": "London"}


def test_questions_differing_only_in_case_or_spaces_are_the_same_question():
    reqs = [_req("Ada", "Ada was born in", "London"),
            _req("Bob", "bob  WAS born in", "Paris"),
            _req("Cy", "Cy works for", "IBM")]
    reqs[1]["subject"] = "bob"
    out, _ = with_same_subject_probes(reqs)
    assert out[0]["locality"][SAME_SUBJECT]["prompt"] == "Ada works for"


def test_a_probe_equal_to_the_paraphrase_is_passed_over():
    reqs = [_req("Ada", "Ada was born in", "London", rephrase="Ada came from"),
            _req("Bob", "Bob came from", "Paris"),
            _req("Cy", "Cy works for", "IBM")]
    out, _ = with_same_subject_probes(reqs)
    assert out[0]["locality"][SAME_SUBJECT]["prompt"] == "Ada works for"


def test_records_without_a_usable_question_get_none_and_are_counted():
    reqs = [_req("Ada", "Ada and Ada were born in", "London"),  # subject twice
            _req("Bob", "Bob was born in", "Paris"),
            _req("Cy", "Cy was born in", "Rome")]               # only Bob's question left
    out, missing = with_same_subject_probes(reqs)
    assert SAME_SUBJECT not in out[0]["locality"]
    assert SAME_SUBJECT not in out[1]["locality"] and SAME_SUBJECT not in out[2]["locality"]
    assert missing == 3
    assert with_same_subject_probes([]) == ([], 0)


def test_an_existing_same_subject_probe_is_kept():
    reqs = [_req("Ada", "Ada was born in", "London", same_subject=("Ada sings", "alto")),
            _req("Bob", "Bob works for", "IBM")]
    out, _ = with_same_subject_probes(reqs)
    assert out[0]["locality"][SAME_SUBJECT] == {"prompt": "Ada sings", "ground_truth": "alto"}


def test_braces_in_a_question_are_plain_text():
    reqs = [_req("Ada", "Ada was born in", "London"), _req("Bob", "Bob {0} is", "odd")]
    out, _ = with_same_subject_probes(reqs)
    assert out[0]["locality"][SAME_SUBJECT]["prompt"] == "Ada {0} is"
