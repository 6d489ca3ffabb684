"""Edit sets over the testbed world, in EasyEdit's zsRE and CounterFact formats.

An edit rewrites one people fact ``(subject, relation, object)`` to a counterfactual
``target_new``: another object of the same relation, whose first token differs from the
model's own prediction before editing (so an unedited model scores 0 exact match on it).

* the edit prompt uses one of the templates :data:`~.world.EDIT_TEMPLATES` (0-3);
* the paraphrase (``rephrase_prompt``) uses a held-back template,
  :data:`~.world.REPHRASE_TEMPLATES` (4-5), never the edit prompt's one. All templates were
  seen in pretraining; "held back" only means the editor never sees that wording;
* three locality probes, each a fact the unedited model completes exactly:

  - ``landmark``: a landmark fact (no person, no person relation): the easy, unrelated case;
  - ``same_relation``: the edit prompt's relation in the edit prompt's template, asked about
    another person whose fact in that relation is edited nowhere in the set (CounterFact's
    neighbourhood prompt);
  - ``same_subject``: the edited person asked about another relation that is edited nowhere
    in the set for that person (absent when every fact of the person is edited).

  The two neighbour kinds are what a routing-based editor can leak into: the same wording
  about someone else, the same person in other words.

At most one edit per (subject, relation); everything is drawn from ``random.Random(seed)``
(model predictions only filter candidates), so the same world, model and seed give the same
edit set.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from .world import EDIT_TEMPLATES, REPHRASE_TEMPLATES, World

__all__ = [
    "EditCase",
    "make_edit_cases",
    "zsre_records",
    "counterfact_records",
    "make_edit_set",
    "to_requests",
    "editor_inputs",
    "LOCALITY_KINDS",
]


@dataclass(frozen=True)
class EditCase:
    """One counterfactual edit with everything needed to evaluate it."""

    case_id: int
    subject: str
    relation: str
    ground_truth: str
    target_new: str
    prompt: str
    prompt_template: int
    rephrase_prompt: str
    rephrase_template: int
    locality_prompt: str
    locality_ground_truth: str
    locality_subject: str
    locality_relation: str
    same_relation_prompt: Optional[str] = None
    same_relation_ground_truth: Optional[str] = None
    same_subject_prompt: Optional[str] = None
    same_subject_ground_truth: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _first_token(tok, prompt: str, target: str) -> int:
    from .tokenizer import target_token_ids

    ids = target_token_ids(tok, prompt, target)
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return ids[0]


def make_edit_cases(world: World, n: int, seed: int = 0, model=None, tokenizer=None,
                    relations: Optional[Sequence[str]] = None,
                    edit_templates: Sequence[int] = EDIT_TEMPLATES,
                    rephrase_templates: Sequence[int] = REPHRASE_TEMPLATES,
                    batch_size: int = 512) -> List[EditCase]:
    """``n`` edits over distinct (subject, relation) pairs of ``world``.

    With ``model`` and ``tokenizer``, a counterfactual target is only taken if its first
    token differs from the model's greedy first token on the edit prompt, and locality
    prompts are only landmark facts the model completes exactly. Without them, targets just
    differ from the true object (object head words are unique, so their first tokens differ
    too) and any landmark fact may serve for locality.
    """
    if set(edit_templates) & set(rephrase_templates):
        raise ValueError("edit and rephrase templates must be disjoint")
    if (model is None) != (tokenizer is None):
        raise ValueError("give both model and tokenizer, or neither")
    facts = [f for f in world.facts if relations is None or f.relation in relations]
    if n > len(facts):
        raise ValueError(f"asked for {n} edits, the world has {len(facts)} facts"
                         + (f" of relations {list(relations)}" if relations else ""))
    if not world.locality_facts:
        raise ValueError("the world has no landmark facts for locality prompts")
    rng = random.Random(seed)
    chosen = rng.sample(facts, n)
    plan = []
    for f in chosen:
        rel = world.relation(f.relation)
        pt = rng.choice(list(edit_templates))
        rt = rng.choice(list(rephrase_templates))
        candidates = [o for o in rel.objects if o != f.object]
        rng.shuffle(candidates)
        plan.append((f, pt, rt, candidates))

    predicted_first: List[Optional[int]] = [None] * n
    if model is not None:
        from .metrics import score_pairs

        scores = score_pairs(model, tokenizer,
                             [(world.prompt(f, pt), f.object) for f, pt, _, _ in plan],
                             batch_size=batch_size)
        predicted_first = [s[2][0] for s in scores]

    # Locality pool: landmark (fact, template) prompts, in a seeded order, cycled.
    loc_pool = [(f, t, p) for f, t, p in world.iter_prompts(world.locality_facts)]
    if model is not None:
        from .metrics import score_pairs

        loc_scores = score_pairs(model, tokenizer, [(p, f.object) for f, _, p in loc_pool],
                                 batch_size=batch_size)
        loc_pool = [x for x, s in zip(loc_pool, loc_scores) if s[1]]
        if not loc_pool:
            raise ValueError("the model answers no landmark fact correctly")
    rng.shuffle(loc_pool)

    cases = []
    for i, ((f, pt, rt, candidates), first) in enumerate(zip(plan, predicted_first)):
        prompt = world.prompt(f, pt)
        target = None
        for c in candidates:
            if first is None or _first_token(tokenizer, prompt, c) != first:
                target = c
                break
        if target is None:  # pragma: no cover - pools have >= 2 objects with unique heads
            raise ValueError(f"no counterfactual target for {f}")
        lf, _, lp = loc_pool[i % len(loc_pool)]
        rephrase = world.prompt(f, rt)
        assert f.subject in prompt and f.subject in rephrase
        cases.append(EditCase(
            case_id=i, subject=f.subject, relation=f.relation, ground_truth=f.object,
            target_new=target, prompt=prompt, prompt_template=pt, rephrase_prompt=rephrase,
            rephrase_template=rt, locality_prompt=lp, locality_ground_truth=lf.object,
            locality_subject=lf.subject, locality_relation=lf.relation))
    return _with_neighbours(world, cases, seed, model, tokenizer, edit_templates, batch_size)


def _with_neighbours(world: World, cases: List[EditCase], seed: int, model, tokenizer,
                     edit_templates: Sequence[int], batch_size: int) -> List[EditCase]:
    """``cases`` with their ``same_relation`` and ``same_subject`` probes drawn.

    A probe is never an edited (subject, relation) of the set. Candidates come in an order
    drawn from their own seeded RNG (the edits themselves stay what they were before probes
    existed); with a model, a candidate the model does not complete exactly is passed over.
    """
    edited = {(c.subject, c.relation) for c in cases}
    rng = random.Random(f"neighbours-{seed}")
    people = list(world.entities)
    relations = [r.name for r in world.relations]
    objects = {(f.subject, f.relation): f.object for f in world.facts}
    # Per case and kind, candidate prompts (in drawn order) with their true objects.
    queues: List[Dict[str, List[tuple]]] = []
    for c in cases:
        others = [p for p in people if p != c.subject and (p, c.relation) not in edited]
        rng.shuffle(others)
        same_rel = [(world.relation(c.relation).prompt(p, c.prompt_template),
                     objects[(p, c.relation)]) for p in others]
        rels = [r for r in relations if r != c.relation and (c.subject, r) not in edited]
        rng.shuffle(rels)
        same_subj = [(world.relation(r).prompt(c.subject, rng.choice(list(edit_templates))),
                      objects[(c.subject, r)]) for r in rels]
        queues.append({"same_relation": same_rel, "same_subject": same_subj})
    chosen: List[Dict[str, tuple]] = [{} for _ in cases]
    pending = [(i, k) for i in range(len(cases)) for k in ("same_relation", "same_subject")
               if queues[i][k]]
    while pending:
        heads = [queues[i][k][0] for i, k in pending]
        if model is None:
            right = [True] * len(heads)
        else:
            from .metrics import score_pairs

            right = [s[1] for s in score_pairs(model, tokenizer, heads, batch_size=batch_size)]
        still = []
        for (i, k), head, ok in zip(pending, heads, right):
            if ok:
                chosen[i][k] = head
            else:
                queues[i][k].pop(0)
                if queues[i][k]:
                    still.append((i, k))
        pending = still
    out = []
    for c, probes in zip(cases, chosen):
        sr, ss = probes.get("same_relation"), probes.get("same_subject")
        out.append(dataclasses.replace(c, same_relation_prompt=sr and sr[0],
                           same_relation_ground_truth=sr and sr[1],
                           same_subject_prompt=ss and ss[0],
                           same_subject_ground_truth=ss and ss[1]))
    return out


#: Locality probe kinds of the testbed's edit sets, easy first.
LOCALITY_KINDS = ("landmark", "same_relation", "same_subject")
_NEIGHBOUR_FIELDS = ("same_relation_prompt", "same_relation_ground_truth",
                     "same_subject_prompt", "same_subject_ground_truth")


def zsre_records(cases: Sequence[EditCase]) -> List[dict]:
    """zsRE-style records: ``src, rephrase, alt, answers, loc, loc_ans, subject``.

    ``loc`` is a plain cloze prompt (no ``"nq question: "`` prefix: the testbed model was
    never trained on NQ), so EasyEdit's meta-training ``ZsreDataset`` will not take these;
    the editing path (``BaseEditor.edit`` / :func:`to_requests`) does.
    """
    return [{
        "case_id": c.case_id,
        "subject": c.subject,
        "src": c.prompt,
        "rephrase": c.rephrase_prompt,
        "alt": c.target_new,
        "answers": [c.ground_truth],
        "pred": c.ground_truth,
        "loc": c.locality_prompt,
        "loc_ans": c.locality_ground_truth,
        "relation": c.relation,
        **{k: getattr(c, k) for k in _NEIGHBOUR_FIELDS},
    } for c in cases]


def counterfact_records(cases: Sequence[EditCase]) -> List[dict]:
    """CounterFact-style records as in EasyEdit's ``counterfact-edit.json``."""
    return [{
        "case_id": c.case_id,
        "prompt": c.prompt,
        "subject": c.subject,
        "target_new": c.target_new,
        "ground_truth": c.ground_truth,
        "rephrase_prompt": c.rephrase_prompt,
        "locality_prompt": c.locality_prompt,
        "locality_ground_truth": c.locality_ground_truth,
        "relation": c.relation,
        **{k: getattr(c, k) for k in _NEIGHBOUR_FIELDS},
    } for c in cases]


def make_edit_set(world: World, n: int, style: str = "counterfact", seed: int = 0,
                  model=None, tokenizer=None, **kwargs) -> List[dict]:
    """``n`` edit records of ``style`` ``"counterfact"`` or ``"zsre"`` (see :func:`make_edit_cases`)."""
    cases = make_edit_cases(world, n, seed=seed, model=model, tokenizer=tokenizer, **kwargs)
    if style == "counterfact":
        return counterfact_records(cases)
    if style == "zsre":
        return zsre_records(cases)
    raise ValueError(f"style must be 'counterfact' or 'zsre', got {style!r}")


def _normalise(record) -> Dict[str, object]:
    """Common fields of an :class:`EditCase`, a zsRE record or a CounterFact record."""
    if isinstance(record, EditCase):
        record = counterfact_records([record])[0]
    neighbours = {k: record.get(k) for k in _NEIGHBOUR_FIELDS}
    if "src" in record:  # zsRE
        return {**neighbours, "prompt": record["src"], "target_new": record["alt"],
                "ground_truth": record["answers"][0], "rephrase_prompt": record["rephrase"],
                "subject": record["subject"], "loc": record["loc"],
                "loc_ans": record["loc_ans"]}
    return {**neighbours, "prompt": record["prompt"], "target_new": record["target_new"],
            "ground_truth": record["ground_truth"],
            "rephrase_prompt": record["rephrase_prompt"], "subject": record["subject"],
            "loc": record["locality_prompt"], "loc_ans": record["locality_ground_truth"]}


def to_requests(records: Sequence) -> List[dict]:
    """EasyEdit request dicts (what ``BaseEditor._prepare_requests`` builds) from records.

    Accepts :class:`EditCase` objects, zsRE records or CounterFact records.
    """
    out = []
    for r in records:
        c = _normalise(r)
        out.append({
            "prompt": c["prompt"],
            "target_new": c["target_new"],
            "ground_truth": c["ground_truth"],
            "rephrase_prompt": c["rephrase_prompt"],
            "subject": c["subject"],
            "locality": _locality_probes(c),
            "portability": {},
        })
    return out


def _locality_probes(c: Dict[str, object]) -> Dict[str, Dict[str, object]]:
    """The request's ``locality`` dict: one entry per probe kind the record has."""
    probes = {"landmark": (c["loc"], c["loc_ans"]),
              "same_relation": (c["same_relation_prompt"], c["same_relation_ground_truth"]),
              "same_subject": (c["same_subject_prompt"], c["same_subject_ground_truth"])}
    return {k: {"prompt": p, "ground_truth": g} for k, (p, g) in probes.items() if p and g}


def editor_inputs(records: Sequence) -> dict:
    """Keyword arguments for ``BaseEditor.edit(**editor_inputs(records))``."""
    cs = [_normalise(r) for r in records]
    return {
        "prompts": [c["prompt"] for c in cs],
        "target_new": [c["target_new"] for c in cs],
        "ground_truth": [c["ground_truth"] for c in cs],
        "rephrase_prompts": [c["rephrase_prompt"] for c in cs],
        "subject": [c["subject"] for c in cs],
        "locality_inputs": _locality_inputs(cs),
    }


def _locality_inputs(cs: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, list]]:
    """EasyEdit's ``locality_inputs``: one list per kind, so only kinds every record has."""
    probes = [_locality_probes(c) for c in cs]
    return {kind: {"prompt": [p[kind]["prompt"] for p in probes],
                   "ground_truth": [p[kind]["ground_truth"] for p in probes]}
            for kind in LOCALITY_KINDS if all(kind in p for p in probes)}
