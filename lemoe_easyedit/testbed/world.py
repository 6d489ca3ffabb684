"""A synthetic world of facts, generated deterministically from a seed.

The world has two kinds of subjects:

* **people** (``World.entities``), e.g. ``"Varen Oskalu"``, each with one object for every
  person relation (born in a city, citizen of a country, speaks a language...). These are
  the facts that edit sets rewrite;
* **landmarks** (``World.landmarks``), e.g. ``"the Kosta Bridge"``, with their own relations
  (located in a region, designed by an architect...). Landmark facts never share a subject
  or a relation with people facts: they are the unrelated knowledge that locality prompts
  probe.

Every relation has several cloze templates (``"{s} was born in the city of"``) that end right
before the object, so ``prompt + " " + object`` is a sentence. The language model of the
testbed is trained on every fact stated in every template (:meth:`World.training_examples`).

Everything is plain Python driven by ``random.Random(seed)``: the same arguments give the
same world on any machine and Python version.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "Relation",
    "Fact",
    "World",
    "PERSON_RELATIONS",
    "LANDMARK_RELATIONS",
    "EDIT_TEMPLATES",
    "REPHRASE_TEMPLATES",
]

#: Templates 0-3 of a person relation are used for edit prompts, 4-5 for paraphrases.
EDIT_TEMPLATES: Tuple[int, ...] = (0, 1, 2, 3)
REPHRASE_TEMPLATES: Tuple[int, ...] = (4, 5)

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "b", "d", "k", "l", "m", "n", "r", "s", "t", "v",
           "br", "dr", "gr", "kr", "tr", "th", "sh", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "x"]


@dataclass(frozen=True)
class Relation:
    """A relation: its cloze templates and the pool its objects are drawn from.

    ``kind`` is ``"person"`` (edited facts) or ``"landmark"`` (locality facts); ``object_kind``
    names what an object is (``"city"``...) and is used for the question templates.
    """

    name: str
    kind: str
    object_kind: str
    templates: Tuple[str, ...]
    objects: Tuple[str, ...] = ()

    def prompt(self, subject: str, template_index: int = 0) -> str:
        return self.templates[template_index].format(s=subject)


@dataclass(frozen=True)
class Fact:
    """``(subject, relation, object)``; ``relation`` is the relation's name."""

    subject: str
    relation: str
    object: str

    def as_tuple(self) -> Tuple[str, str, str]:
        return (self.subject, self.relation, self.object)


_NAME = "<person-like name>"  # tail marker: objects are two-word person-like names

# Relation specs: (name, object kind, templates, tail words used to build objects).
# Templates end right before the object. Tail words make object names multi-token and
# typed ("Velmar Falls" is a city, "Velmar Rovers" a team); the head word of every object is
# a fresh synthetic word, unique in the world, so two objects never share a first token.
_PERSON_SPECS: List[Tuple[str, str, Tuple[str, ...], Tuple[str, ...]]] = [
    ("birthplace", "city", (
        "{s} was born in the city of",
        "The birthplace of {s} is",
        "{s} came into the world in",
        "Question: In which city was {s} born? Answer:",
        "The city where {s} was born is called",
        "According to the records, {s} was born in",
    ), ("", "", "Falls", "Harbor", "Heights")),
    ("citizenship", "country", (
        "{s} is a citizen of",
        "The nationality of {s} is that of",
        "{s} holds a passport issued by",
        "Question: Which country is {s} a citizen of? Answer:",
        "{s} has the citizenship of",
        "By citizenship, {s} belongs to",
    ), ("", "", "Republic", "Kingdom", "Isles")),
    ("language", "language", (
        "The native language of {s} is",
        "{s} grew up speaking",
        "The mother tongue of {s} is",
        "Question: What is the first language of {s}? Answer:",
        "{s} is a native speaker of",
        "At home, {s} always speaks",
    ), ("", "", "", "Creole")),
    ("profession", "profession", (
        "{s} works as a",
        "The profession of {s} is",
        "By trade, {s} is a",
        "Question: What is the job of {s}? Answer:",
        "{s} earns a living as a",
        "The occupation of {s} is",
    ), ("smith", "keeper", "weaver", "binder", "surveyor", "mender")),
    ("instrument", "instrument", (
        "{s} plays the",
        "The instrument played by {s} is the",
        "On stage, {s} performs on the",
        "Question: Which instrument does {s} play? Answer: the",
        "The favourite instrument of {s} is the",
        "{s} is a skilled player of the",
    ), ("", "horn", "harp", "drum", "flute")),
    ("university", "university", (
        "{s} studied at",
        "The alma mater of {s} is",
        "{s} graduated from",
        "Question: Which university did {s} attend? Answer:",
        "The university attended by {s} is",
        "{s} received a degree from",
    ), ("University", "Institute", "College", "Academy")),
    ("team", "team", (
        "{s} is a fan of",
        "The favourite team of {s} is",
        "{s} supports the team",
        "Question: Which team does {s} support? Answer:",
        "The team cheered on by {s} is",
        "Every weekend, {s} cheers for",
    ), ("Rovers", "United", "Wanderers", "Athletic", "Rangers")),
    ("colour", "colour", (
        "The favourite colour of {s} is",
        "{s} likes the colour",
        "The colour that {s} loves most is",
        "Question: What is the favourite colour of {s}? Answer:",
        "{s} paints everything in",
        "Asked about colours, {s} always names",
    ), ("", "", "grey", "green", "blue")),
    ("pet", "animal", (
        "{s} keeps a pet",
        "The pet of {s} is a",
        "At home, {s} looks after a",
        "Question: What kind of pet does {s} have? Answer: a",
        "The animal that lives with {s} is a",
        "{s} walks a pet",
    ), ("", "", "hound", "cat", "bird")),
    ("employer", "company", (
        "{s} is employed by",
        "The employer of {s} is",
        "{s} works for the company",
        "Question: Which company employs {s}? Answer:",
        "The company that pays {s} is",
        "Every morning, {s} goes to work at",
    ), ("Systems", "Industries", "Works", "Holdings", "Labs")),
    ("dish", "dish", (
        "The favourite dish of {s} is",
        "{s} loves to eat",
        "For dinner, {s} usually cooks",
        "Question: What is the favourite food of {s}? Answer:",
        "The meal that {s} likes best is",
        "{s} always orders",
    ), ("stew", "pie", "soup", "cake", "")),
    ("sport", "sport", (
        "{s} plays the sport of",
        "The favourite sport of {s} is",
        "{s} trains every day at",
        "Question: Which sport does {s} play? Answer:",
        "The sport practised by {s} is",
        "In the summer, {s} competes at",
    ), ("", "", "ball", "racing")),
]

_LANDMARK_SPECS: List[Tuple[str, str, Tuple[str, ...], Tuple[str, ...]]] = [
    ("region", "region", (
        "{s} is located in the region of",
        "Tourists visit {s} in the region of",
        "The region that contains {s} is",
    ), ("", "", "Valley", "Coast")),
    ("architect", "architect", (
        "{s} was designed by the architect",
        "The architect of {s} was",
        "The plans for {s} were drawn by",
    ), (_NAME,)),
    ("material", "material", (
        "{s} is built mostly of",
        "The main building material of {s} is",
        "The walls of {s} are made of",
    ), ("stone", "brick", "glass", "timber", "marble")),
    ("century", "century", (
        "{s} was completed in the century of",
        "The construction of {s} ended in the century of",
        "{s} dates from the century of",
    ), ("Era", "Age")),
]

_LANDMARK_KINDS = ("Bridge", "Tower", "Palace", "Cathedral", "Lighthouse", "Gate",
                   "Museum", "Fortress", "Theatre", "Aqueduct")

PERSON_RELATIONS: Tuple[str, ...] = tuple(s[0] for s in _PERSON_SPECS)
LANDMARK_RELATIONS: Tuple[str, ...] = tuple(s[0] for s in _LANDMARK_SPECS)


class _Words:
    """Fresh capitalised syllable words, never repeated within one world."""

    def __init__(self, rng: random.Random, reserved: Sequence[str] = ()):
        self.rng = rng
        self.used = {w.lower() for w in reserved}

    def new(self, min_syl: int = 2, max_syl: int = 3) -> str:
        for _ in range(10_000):
            n = self.rng.randint(min_syl, max_syl)
            parts = []
            for i in range(n):
                coda = self.rng.choice(_CODAS) if i == n - 1 else ""
                parts.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + coda)
            word = "".join(parts)
            if word not in self.used:
                self.used.add(word)
                return word.capitalize()
        raise RuntimeError("ran out of fresh words")


def _template_words(specs) -> List[str]:
    words = []
    for _, _, templates, tails in specs:
        for t in templates:
            words.extend(t.replace("{s}", " ").replace("?", " ").replace(",", " ")
                         .replace(":", " ").split())
        words.extend(w for w in tails if w and w != _NAME)
    return words


@dataclass
class World:
    """A deterministic synthetic world; build one with :meth:`World.generate`."""

    seed: int
    entities: List[str]
    relations: List[Relation]
    facts: List[Fact]
    landmarks: List[str] = field(default_factory=list)
    landmark_relations: List[Relation] = field(default_factory=list)
    locality_facts: List[Fact] = field(default_factory=list)
    params: Dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def generate(cls, seed: int = 0, n_entities: int = 320, n_relations: int = 12,
                 n_objects: int = 30, n_landmarks: int = 150,
                 n_landmark_relations: int = 3, n_landmark_objects: int = 20) -> "World":
        """Generate the world of ``seed``.

        ``n_entities`` people with one fact for each of the first ``n_relations`` person
        relations (so ``n_entities * n_relations`` facts), objects drawn from pools of
        ``n_objects`` names per relation; ``n_landmarks`` landmarks with
        ``n_landmark_relations`` relations each for locality.
        """
        if not 1 <= n_relations <= len(_PERSON_SPECS):
            raise ValueError(f"n_relations must be in 1..{len(_PERSON_SPECS)}")
        if not 0 <= n_landmark_relations <= len(_LANDMARK_SPECS):
            raise ValueError(f"n_landmark_relations must be in 0..{len(_LANDMARK_SPECS)}")
        if n_objects < 2 or n_landmark_objects < 2:
            raise ValueError("object pools need at least 2 objects")
        rng = random.Random(seed)
        words = _Words(rng, _template_words(_PERSON_SPECS + _LANDMARK_SPECS))

        def pool(tails: Tuple[str, ...], n: int, lower: bool) -> Tuple[str, ...]:
            if tails == (_NAME,):
                return tuple(f"{words.new(2, 2)} {words.new(2, 3)}" for _ in range(n))
            out = []
            for _ in range(n):
                head = words.new(2, 3)
                if lower:
                    head = head.lower()
                tail = rng.choice(tails)
                out.append(f"{head} {tail}" if tail else head)
            return tuple(out)

        lower_kinds = {"profession", "instrument", "colour", "animal", "dish", "sport",
                       "material"}
        relations = [
            Relation(name, "person", kind, templates, pool(tails, n_objects, kind in lower_kinds))
            for name, kind, templates, tails in _PERSON_SPECS[:n_relations]
        ]
        landmark_relations = [
            Relation(name, "landmark", kind, templates,
                     pool(tails, n_landmark_objects, kind in lower_kinds))
            for name, kind, templates, tails in _LANDMARK_SPECS[:n_landmark_relations]
        ]
        entities = [f"{words.new(2, 2)} {words.new(2, 3)}" for _ in range(n_entities)]
        landmarks = [f"the {words.new(2, 3)} {rng.choice(_LANDMARK_KINDS)}"
                     for _ in range(n_landmarks)]

        facts = [Fact(e, r.name, rng.choice(r.objects)) for e in entities for r in relations]
        locality_facts = [Fact(l, r.name, rng.choice(r.objects))
                          for l in landmarks for r in landmark_relations]
        params = dict(seed=seed, n_entities=n_entities, n_relations=n_relations,
                      n_objects=n_objects, n_landmarks=n_landmarks,
                      n_landmark_relations=n_landmark_relations,
                      n_landmark_objects=n_landmark_objects)
        return cls(seed, entities, relations, facts, landmarks, landmark_relations,
                   locality_facts, params)

    # ------------------------------------------------------------------ look-ups
    def relation(self, name: str) -> Relation:
        for r in self.relations + self.landmark_relations:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def n_templates(self) -> int:
        """Number of templates of every person relation."""
        return len(self.relations[0].templates)

    def prompt(self, fact: Fact, template_index: int = 0) -> str:
        """The cloze prompt stating ``fact`` in template ``template_index`` (without the object)."""
        return self.relation(fact.relation).prompt(fact.subject, template_index)

    def sentence(self, fact: Fact, template_index: int = 0) -> str:
        return self.prompt(fact, template_index) + " " + fact.object

    def facts_of(self, subject: str) -> List[Fact]:
        return [f for f in self.facts + self.locality_facts if f.subject == subject]

    def lookup(self, subject: str, relation: str) -> Fact:
        for f in self.facts + self.locality_facts:
            if f.subject == subject and f.relation == relation:
                return f
        raise KeyError((subject, relation))

    # ------------------------------------------------------------------ text
    def training_examples(self, include_locality: bool = True) -> List[Tuple[str, str]]:
        """``(prompt, object)`` for every fact in every template of its relation.

        Person facts first (fact-major, template-minor), then landmark facts.
        """
        facts = list(self.facts) + (list(self.locality_facts) if include_locality else [])
        out = []
        for f in facts:
            rel = self.relation(f.relation)
            for t in range(len(rel.templates)):
                out.append((rel.prompt(f.subject, t), f.object))
        return out

    def training_text(self, include_locality: bool = True) -> List[str]:
        """Every training sentence, ``prompt + " " + object``."""
        return [p + " " + o for p, o in self.training_examples(include_locality)]

    def iter_prompts(self, facts: Optional[Sequence[Fact]] = None,
                     templates: Optional[Sequence[int]] = None) -> Iterator[Tuple[Fact, int, str]]:
        """``(fact, template_index, prompt)`` over ``facts`` (default all people facts)."""
        for f in (self.facts if facts is None else facts):
            rel = self.relation(f.relation)
            for t in (range(len(rel.templates)) if templates is None else templates):
                yield f, t, rel.prompt(f.subject, t)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "params": dict(self.params),
            "entities": list(self.entities),
            "relations": [asdict(r) for r in self.relations],
            "facts": [f.as_tuple() for f in self.facts],
            "landmarks": list(self.landmarks),
            "landmark_relations": [asdict(r) for r in self.landmark_relations],
            "locality_facts": [f.as_tuple() for f in self.locality_facts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "World":
        """Inverse of :meth:`to_dict` (e.g. the ``world.json`` shipped with the model)."""
        def rel(d):
            return Relation(d["name"], d["kind"], d["object_kind"], tuple(d["templates"]),
                            tuple(d["objects"]))

        return cls(
            seed=data["seed"],
            entities=list(data["entities"]),
            relations=[rel(d) for d in data["relations"]],
            facts=[Fact(*f) for f in data["facts"]],
            landmarks=list(data["landmarks"]),
            landmark_relations=[rel(d) for d in data["landmark_relations"]],
            locality_facts=[Fact(*f) for f in data["locality_facts"]],
            params=dict(data.get("params", {})),
        )

    def fingerprint(self) -> str:
        """SHA-256 of the world's content: equal fingerprints mean equal worlds."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def summary(self) -> Dict[str, int]:
        return {
            "entities": len(self.entities),
            "relations": len(self.relations),
            "facts": len(self.facts),
            "templates_per_relation": self.n_templates,
            "objects_per_relation": len(self.relations[0].objects),
            "landmarks": len(self.landmarks),
            "landmark_relations": len(self.landmark_relations),
            "locality_facts": len(self.locality_facts),
            "training_sentences": len(self.training_examples()),
        }
