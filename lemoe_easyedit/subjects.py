"""Subject routing (``router: subject``): a position goes to the expert of the last edit
subject that occurs in the text up to it.

Why: on people's phrasings (EasyEdit's CounterFact and zsRE files) a paraphrase of an edit
and a neighbour (same relation, another subject) differ in the subject and little else, and
no query computed at the position being predicted tells them apart (measured in
``examples/results/realfact-subject-keys.md``). The subject's tokens do: they are in every
paraphrase and in no neighbour. So each expert keeps the token ids of its edits' subjects
(the forms a tokenizer gives the subject at the start of a text, after a space, before a
possessive or punctuation mark, and inside the edit prompt), and a forward finds them in its input ids: the subject that ended last at
or before a position is that position's subject, and every later one's up to the end of the
sequence (including generated tokens, carried between KV-cache steps). Among the experts
holding edits of that subject (one person's birthplace and employer may sit in two), the
position goes to the one whose anchor is nearest, as the anchor router would choose among
all experts (:func:`~.routing.select_subject_routes`).

Matching is exact and tensor code: each window of the input ending at a position is hashed
(a polynomial over the ids, wrapping in int64), looked up with ``searchsorted`` in the
experts' sorted subject hashes, and confirmed token by token, so a hash collision never
routes. A subject is identified by a key derived from its string (:func:`subject_key`),
stored with each of its token forms and with each anchor of its edits.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

#: A subject is matched on its last this-many tokens (longer names are rare, and the
#: tail of earlier positions kept between generation steps is this long minus one).
MAX_SUBJECT_TOKENS = 32
#: Odd multiplier of the window hash (any odd 64-bit constant mixes ids well enough: a
#: collision is caught by the token-by-token check).
_HASH_BASE = 0x9E3779B97F4A7C15 - (1 << 64)


#: What may stand right before and right after a subject in a text. A tokenizer that does
#: not split punctuation from words (the realfact BPE: ``Royer's`` -> ``▁Roy``, ``er's``)
#: spells a subject's last token differently before ``'s`` or ``,``: each such spelling is
#: a form of its own.
_BEFORE = ("", "x ", "x (", 'x "')
_AFTER = ("", "'s", "’s", "'", ",", ".", "?", "!", ":", ";", ")", '"')


def subject_token_forms(tok, request: Dict) -> List[List[int]]:
    """The token-id sequences under which ``request["subject"]`` may appear in a text.

    The tokens covering the subject at the start of a text and after a space, bracket or
    quote, each followed by nothing, a possessive or a punctuation mark (:data:`_BEFORE`,
    :data:`_AFTER`), and inside the edit prompt; a fast tokenizer's offsets locate them
    (a slow one gives the first two plain forms only). Raises ValueError when the request
    has no subject or the subject yields no tokens.
    """
    subject = request.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"router 'subject' needs each request's 'subject'; got {subject!r} "
                         f"for prompt {request.get('prompt')!r}")
    if getattr(tok, "is_fast", False):
        texts = [before + subject + after for before in _BEFORE for after in _AFTER]
        starts = [len(before) for before in _BEFORE for _ in _AFTER]
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)  # one call
        forms = [_covering(ids, offsets, start, start + len(subject)) for ids, offsets, start
                 in zip(enc["input_ids"], enc["offset_mapping"], starts)]
    else:
        forms = [_ids(tok, subject)]
        before = _ids(tok, "x")
        spaced = _ids(tok, "x " + subject)
        if spaced[:len(before)] == before:
            forms.append(spaced[len(before):])
    forms.append(_in_prompt(tok, request["prompt"], subject))
    out: List[List[int]] = []
    for form in forms:
        form = form[-MAX_SUBJECT_TOKENS:] if form else form
        if form and form not in out:
            out.append(form)
    if not out:
        raise ValueError(f"subject {subject!r} has no tokens")
    return out


def _ids(tok, text: str) -> List[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _covering(ids: Sequence[int], offsets, start: int, end: int) -> List[int]:
    """The token ids whose character ``offsets`` overlap ``[start, end)``."""
    return [i for i, (a, b) in zip(ids, offsets) if a < end and b > start]


def _in_prompt(tok, prompt: str, subject: str) -> List[int]:
    """The prompt's tokens that overlap the subject's last occurrence (empty: the tokenizer
    gives no offsets, or the subject is not in the prompt)."""
    start = prompt.rfind(subject)
    if start < 0 or not getattr(tok, "is_fast", False):
        return []
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return _covering(enc["input_ids"], enc["offset_mapping"], start, start + len(subject))


def subject_positions(tok, request: Dict, ids: Sequence[int]) -> range:
    """The positions in ``ids`` of the last occurrence of any token form of
    ``request["subject"]`` (:func:`subject_token_forms`); empty when the request has no
    subject or none of its forms is there."""
    subject = request.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        return range(0)
    ids = list(ids)
    found = [(start, len(form)) for form in subject_token_forms(tok, request)
             for start in range(len(ids) - len(form), -1, -1)
             if ids[start:start + len(form)] == form]
    if not found:
        return range(0)
    start, n = max(found)  # the last occurrence; of two forms starting there, the longer
    return range(start, start + n)


def subject_key(subject: str) -> int:
    """A non-negative int64 naming ``subject``, the same in every process (Python's own
    ``hash`` of a string is salted per process, and keys are saved with the edits)."""
    digest = hashlib.blake2b(subject.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def subject_rows(tok, records: Sequence[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rows [S, L], keys [S])`` int64: every token form of every record's subject,
    right-padded with -1 (:func:`subject_token_forms`), and the :func:`subject_key` of each;
    what an :class:`~.layer.ExpertSlot` stores."""
    forms, keys = [], []
    for r in records:
        for form in subject_token_forms(tok, r):
            forms.append(form)
            keys.append(subject_key(r["subject"]))
    width = max(len(f) for f in forms)
    rows = torch.full((len(forms), width), -1, dtype=torch.long)
    for i, form in enumerate(forms):
        rows[i, :len(form)] = torch.tensor(form, dtype=torch.long)
    return rows, torch.tensor(keys, dtype=torch.long)


def window_hashes(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Hash of each window of ``n`` ids along the last dimension: ``[..., L - n + 1]``."""
    windows = ids.unfold(-1, n, 1)
    powers = _powers(n, ids.device)
    return (windows * powers).sum(-1)


def _powers(n: int, device) -> torch.Tensor:
    p, out = 1, []
    for _ in range(n):
        out.append(p)
        p = ((p * _HASH_BASE + (1 << 63)) % (1 << 64)) - (1 << 63)  # int64 wrap-around
    return torch.tensor(out[::-1], dtype=torch.long, device=device)


class SubjectIndex:
    """The enabled experts' subjects, grouped by length for lookup.

    ``slot_forms``: per slot, its ``(rows [S, L], keys [S])`` (:func:`subject_rows`), or
    None for a disabled slot. For each length ``n``: the sorted window hashes, the forms in
    that order (to confirm a match) and each one's subject key.
    """

    def __init__(self, slot_forms: Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]],
                 device) -> None:
        by_length: Dict[int, List[tuple]] = {}
        for entry in slot_forms:
            if entry is None:
                continue
            rows, keys = entry
            for row, key in zip(rows.tolist(), keys.tolist()):
                form = [t for t in row if t >= 0]
                if form:
                    by_length.setdefault(len(form), []).append((form, key))
        self.lengths: List[int] = sorted(by_length)
        self.tables = []
        for n in self.lengths:
            forms = torch.tensor([f for f, _ in by_length[n]], dtype=torch.long, device=device)
            keys = torch.tensor([k for _, k in by_length[n]], dtype=torch.long, device=device)
            hashes, order = torch.sort(window_hashes(forms, n).squeeze(-1), stable=True)
            self.tables.append((n, hashes, forms[order], keys[order]))

    @property
    def longest(self) -> int:
        return self.lengths[-1] if self.lengths else 0

    def matches(self, ids: torch.Tensor, first: int) -> torch.Tensor:
        """``[B, T]``: the key of the subject that ends at each of the last ``T = L - first``
        positions of ``ids`` ``[B, L]`` (-1: none; negative ids never match). Where subjects
        of several lengths end at one position, the longest wins."""
        B, L = ids.shape
        found = torch.full((B, L - first), -1, dtype=torch.long, device=ids.device)
        for n, hashes, forms, keys in self.tables:
            # Windows ending at positions first..L-1 (those starting before 0 cannot match).
            lo = max(first - n + 1, 0)
            if L - lo < n:
                continue
            span = ids[:, lo:]
            h = window_hashes(span, n)                                  # [B, L - lo - n + 1]
            at = (torch.searchsorted(hashes, h.contiguous(), right=True) - 1).clamp_min(0)
            hit = hashes[at] == h
            hit &= (span.unfold(-1, n, 1) == forms[at]).all(-1)        # no collision routes
            key = torch.where(hit, keys[at], -1)
            # The window starting at span[j] ends at position lo + j + n - 1.
            end = lo + n - 1
            skip = max(first - end, 0)
            key = key[:, skip:]
            dst = end + skip - first
            found[:, dst:dst + key.shape[1]] = torch.where(
                key >= 0, key, found[:, dst:dst + key.shape[1]])
        return found


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the last position at or before each position where ``mask`` ``[B, T]`` is
    true, -1 where there is none."""
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device).expand(B, T)
    return torch.where(mask, pos, -1).cummax(1).values


def run_starts(found: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the position at or before each position where the last subject match of
    ``found`` ``[B, T]`` (-1: none) ended, -1 where there is none in this forward (the run
    in progress began in an earlier forward, or no subject yet)."""
    return last_true(found >= 0)


def carry(found: torch.Tensor, carried: Optional[torch.Tensor],
          last: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T]``: at each position the subject found last at or before it (``found``
    ``[B, T]``, -1 none), else ``carried`` ``[B]`` (the subject of the earlier positions
    of the sequence; None: -1). ``last``: ``run_starts(found)`` when already computed."""
    B, T = found.shape
    if last is None:
        last = run_starts(found)
    out = found.gather(1, last.clamp_min(0))
    before = torch.full((B, 1), -1, dtype=torch.long, device=found.device) \
        if carried is None else carried.reshape(B, 1)
    return torch.where(last >= 0, out, before)
