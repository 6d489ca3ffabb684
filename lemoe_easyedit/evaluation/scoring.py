"""Scoring edits with EasyEdit's metric functions, plus greedy whole-target exact match.

* ``rel`` / ``gen``: EasyEdit's ``compute_edit_quality`` (``rewrite_acc`` / ``rephrase_acc``):
  teacher-forced token accuracy of the target after the prompt / paraphrase;
* ``loc``: fraction of the locality prompt's argmax tokens (over the locality answer's
  positions) equal to those of the **unedited** model, computed once before any edit;
  ``loc:<kind>`` per probe kind, ``loc`` their mean;
* ``rel_em`` / ``gen_em``: ``len(target tokens)`` tokens generated greedily after the prompt
  equal the target tokens (those EasyEdit scores: ``tok(prompt + " " + target)`` after
  ``tok(prompt)``); ``loc_em``: the greedy locality continuation equals the unedited one;
* ``rel_wild`` / ``gen_wild``: free generation as a user sees it ("WILD" evaluation): greedy
  decoding produces the target tokens *and then the end token* (``tok.eos_token``), i.e. the
  model states the object and stops on its own; ``loc_wild``: the greedy locality
  continuation, one token past the answer (where a model that ends its facts emits the end
  token), identical to the unedited model's. Only with greedy scoring and an end token;
* ``eval_metric="ppl"`` (hallucination data): ``rel_ppl`` / ``gen_ppl``, EasyEdit's ``PPL`` of
  ``target_new``, instead of the accuracies and exact matches.

Scoring never truncates: the metric functions get a copy of the hparams whose ``max_length``
is the model's context length (:func:`scoring_hparams`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm


from .models import _context_length, _model_device

#: Per-edit metrics in [0, 1] (token_em) and the perplexities (ppl).
METRIC_KEYS = ("rel", "gen", "loc", "rel_em", "gen_em", "loc_em", "rel_wild", "gen_wild",
               "loc_wild")
PPL_KEYS = ("rel_ppl", "gen_ppl", "loc")


def target_token_ids(tok, prompt: str, target: str) -> Tuple[List[int], List[int]]:
    """``(prompt ids, target ids)`` as EasyEdit's ``test_prediction_acc`` sees them: the ids
    of ``prompt + " " + target`` after the ids of ``prompt``."""
    p_ids = tok(prompt)["input_ids"]
    f_ids = tok(prompt + " " + target)["input_ids"]
    return list(p_ids), list(f_ids[len(p_ids):])


@torch.no_grad()
def greedy_generate(model, tok, prompts: Sequence[str], n_tokens: Sequence[int],
                    batch_size: int = 16) -> List[List[int]]:
    """Greedy continuation of each prompt by ``n_tokens[i]`` tokens.

    No KV cache and right padding: every step re-runs the whole (causal) sequence, so the
    model sees exactly what teacher-forced scoring shows it, whatever adaptor it carries.
    """
    device = _model_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: List[List[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -n_tokens[i])
    for b in range(0, len(order), batch_size):
        idx = [i for i in order[b:b + batch_size] if n_tokens[i] > 0]
        if not idx:
            continue
        seqs = [list(tok(prompts[i])["input_ids"]) for i in idx]
        lengths = [len(s) for s in seqs]
        steps = max(n_tokens[i] for i in idx)
        width = max(lengths) + steps
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        cur = torch.tensor(lengths)
        for step in range(steps):
            span = int(cur.max())
            mask = (torch.arange(span)[None, :] < cur[:, None]).long()
            logits = model(input_ids=ids[:, :span].to(device),
                           attention_mask=mask.to(device)).logits
            rows = torch.arange(len(idx))
            nxt = logits[rows, (cur - 1).to(logits.device)].argmax(-1).cpu()
            for r, i in enumerate(idx):
                if step < n_tokens[i]:
                    ids[r, cur[r]] = nxt[r]
                    out[i].append(int(nxt[r]))
            active = torch.tensor([step < n_tokens[i] for i in idx])
            cur = cur + active.long()
    return out


def _locality_probes(request: dict) -> List[Tuple[str, str, str]]:
    loc = request.get("locality") or {}
    return [(k, v["prompt"], v["ground_truth"]) for k, v in loc.items()
            if isinstance(v, dict) and v.get("prompt") and v.get("ground_truth")]


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and not
            (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _as_float(x) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, (list, tuple, np.ndarray)):
        vals = [float(v) for v in np.ravel(np.asarray(x, dtype=float))]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else None
    v = float(x)
    return None if math.isnan(v) else v


def _agreement(post, pre) -> Optional[float]:
    a, b = np.ravel(np.asarray(post, dtype=object)), np.ravel(np.asarray(pre, dtype=object))
    if a.size == 0 or a.size != b.size:
        # Flatten ragged nests element-wise as EasyEdit's np.equal would.
        a = np.asarray(_flatten(post))
        b = np.asarray(_flatten(pre))
        if a.size == 0 or a.size != b.size:
            return None
    return float(np.mean(a == b))


def _flatten(x) -> List:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flatten(item)]
    return [x]


def scoring_hparams(hparams, model):
    """A copy of ``hparams`` whose ``max_length`` covers the model's context: EasyEdit's
    metric functions would otherwise score a truncated sequence (the method's own
    ``max_length`` still applies to its editing)."""
    out = copy.copy(hparams)
    out.max_length = max(int(getattr(hparams, "max_length", 0) or 0), _context_length(model))
    return out


@dataclass
class Scorer:
    """Scores requests on a model with EasyEdit's metric functions (see module docstring)."""

    tok: Any
    hparams: Any
    eval_metric: str = "token_em"
    greedy: bool = True
    progress: bool = True
    device: Any = None
    pre_loc: List[Dict[str, Any]] = field(default_factory=list)
    pre_loc_gen: List[Dict[str, List[int]]] = field(default_factory=list)

    def _quality(self, model, request: dict) -> dict:
        from easyeditor.evaluate import compute_edit_quality

        record = dict(request)
        record["locality"] = {k: {"prompt": p, "ground_truth": g}
                              for k, p, g in _locality_probes(request)}
        record["portability"] = {}
        name = self.hparams.model_name if isinstance(self.hparams.model_name, str) else "model"
        with torch.no_grad():
            return compute_edit_quality(model, name, self.hparams, self.tok, record,
                                        self.device, eval_metric=self.eval_metric)

    def _locality_tokens(self, model, key: str, prompt: str, answer: str):
        from easyeditor.evaluate.evaluate import compute_locality_quality

        name = self.hparams.model_name if isinstance(self.hparams.model_name, str) else "model"
        with torch.no_grad():
            out = compute_locality_quality(model, name, self.hparams, self.tok, key, prompt,
                                           answer, self.device)
        return out[f"{key}_output"]

    def prepare(self, model, requests: Sequence[dict]) -> None:
        """Unedited-model locality tokens (and greedy locality continuations), once."""
        self.pre_loc = []
        self.pre_loc_gen = [{} for _ in requests]
        it = tqdm(requests, desc="unedited locality", leave=False, disable=not self.progress)
        jobs: List[Tuple[int, str, str, str]] = []
        for i, r in enumerate(it):
            probes = _locality_probes(r)
            self.pre_loc.append({k: self._locality_tokens(model, k, p, g)
                                 for k, p, g in probes})
            jobs.extend((i, k, p, g) for k, p, g in probes)
        if jobs and self.greedy and self.eval_metric != "ppl":
            # One batched greedy generation for every probe (as score() does), one token
            # past the answer for the WILD comparison.
            extra = 1 if self.tok.eos_token_id is not None else 0
            lengths = [len(target_token_ids(self.tok, p, g)[1]) + extra
                       for _, _, p, g in jobs]
            gens = greedy_generate(model, self.tok, [p for _, _, p, _ in jobs], lengths)
            for (i, k, _, _), got in zip(jobs, gens):
                self.pre_loc_gen[i][k] = got

    def score(self, model, requests: Sequence[dict], indices: Sequence[int],
              desc: str = "scoring") -> List[dict]:
        """Per-edit metrics of ``requests[i]`` for ``i`` in ``indices`` on ``model``."""
        out = []
        greedy_jobs: List[Tuple[int, str, str, str]] = []
        for pos, i in enumerate(tqdm(indices, desc=desc, leave=False,
                                     disable=not self.progress or len(indices) < 20)):
            r = requests[i]
            q = self._quality(model, r)
            m: Dict[str, Any] = {"index": int(i), "case_id": r.get("case_id", i)}
            if self.eval_metric == "ppl":
                m["rel_ppl"] = _as_float(q.get("rewrite_ppl"))
                m["gen_ppl"] = _as_float(q.get("rephrase_ppl")) if r.get("rephrase_prompt") \
                    else None
            else:
                m["rel"] = _as_float(q.get("rewrite_acc"))
                m["gen"] = _as_float(q.get("rephrase_acc")) if r.get("rephrase_prompt") \
                    else None
            locs = []
            for k, _, _ in _locality_probes(r):
                post = q["locality"].get(f"{k}_output")
                pre = self.pre_loc[i].get(k) if i < len(self.pre_loc) else None
                if post is not None and pre is not None:
                    locs.append(_agreement(post, pre))
                    m[f"loc:{k}"] = locs[-1]
            m["loc"] = _mean(locs)
            if self.greedy and self.eval_metric != "ppl":
                greedy_jobs.append((pos, "rel_em", r["prompt"], r["target_new"]))
                if r.get("rephrase_prompt"):
                    greedy_jobs.append((pos, "gen_em", r["rephrase_prompt"], r["target_new"]))
                for k, p, g in _locality_probes(r):
                    greedy_jobs.append((pos, f"loc_em:{k}", p, g))
            out.append(m)
        if greedy_jobs:
            self._score_greedy(model, requests, indices, out, greedy_jobs)
        return out

    def _score_greedy(self, model, requests, indices, out, jobs) -> None:
        eos = self.tok.eos_token_id
        # One token past the target: exact match reads the first len(target) tokens, WILD
        # also wants the end token right after them (the model stops on its own).
        extra = 1 if eos is not None else 0
        wanted = [target_token_ids(self.tok, p, t)[1] for _, _, p, t in jobs]
        gens = greedy_generate(model, self.tok, [p for _, _, p, _ in jobs],
                               [len(w) + extra for w in wanted])
        loc_em: Dict[int, List[float]] = {}
        loc_wild: Dict[int, List[float]] = {}
        for (pos, key, _, _), want, got in zip(jobs, wanted, gens):
            m = out[pos]
            got, n = list(got), len(want)
            if key.startswith("loc_em:"):
                probe = key.split(":", 1)[1]
                pre = self.pre_loc_gen[m["index"]].get(probe)
                if pre is not None:
                    pre = list(pre)
                    loc_em.setdefault(pos, []).append(float(pre[:n] == got[:n]))
                    m[f"loc_em:{probe}"] = loc_em[pos][-1]
                    if extra and len(pre) == n + extra:
                        loc_wild.setdefault(pos, []).append(float(pre == got))
                        m[f"loc_wild:{probe}"] = loc_wild[pos][-1]
            else:
                m[key] = float(n > 0 and got[:n] == list(want))
                if extra:
                    m[key.replace("_em", "_wild")] = float(n > 0 and got == list(want) + [eos])
        for m_pos, m in enumerate(out):
            m.setdefault("rel_em", None)
            m.setdefault("rel_wild", None)
            if requests[m["index"]].get("rephrase_prompt"):
                m.setdefault("gen_em", None)
                m.setdefault("gen_wild", None)
            else:
                m["gen_em"] = m["gen_wild"] = None
            m["loc_em"] = _mean(loc_em.get(m_pos, []))
            m["loc_wild"] = _mean(loc_wild.get(m_pos, []))


def locality_kinds(scores: Sequence[dict]) -> List[str]:
    """The locality probe kinds scored in ``scores`` (per-edit metrics, summaries or
    checkpoints: their ``loc:<kind>`` keys), in order of first appearance."""
    kinds: Dict[str, None] = {}
    for m in scores:
        for key in m:
            if key.startswith("loc:"):
                kinds.setdefault(key[4:])
    return list(kinds)


def _summary(per_edit: Sequence[dict], keys: Sequence[str]) -> Dict[str, Optional[float]]:
    """Means over edits; with several locality kinds, ``loc:<kind>`` / ``loc_em:<kind>`` per
    kind and ``loc`` / ``loc_em`` the mean over kinds (a kind that only some edits have,
    such as the same-subject neighbour of a long stream, weighs as much as the others)."""
    s = {k: _mean(m.get(k) for m in per_edit) for k in keys}
    kinds = locality_kinds(per_edit)
    for prefix in ("loc", "loc_em", "loc_wild"):
        for kind in kinds:
            s[f"{prefix}:{kind}"] = _mean(m.get(f"{prefix}:{kind}") for m in per_edit)
        per_kind = [s[f"{prefix}:{kind}"] for kind in kinds
                    if s.get(f"{prefix}:{kind}") is not None]
        if len(kinds) > 1 and prefix in keys and per_kind:
            s[prefix] = float(np.mean(per_kind))
    main = [s[k] for k in ("rel", "gen", "loc") if s.get(k) is not None]
    if "rel" in keys:
        s["avg"] = float(np.mean(main)) if main else None
    s["n"] = len(per_edit)
    return s


def _average_summaries(summaries: Sequence[dict], keys: Sequence[str]) -> dict:
    per_kind = [f"{p}:{k}" for k in locality_kinds(summaries)
                for p in ("loc", "loc_em", "loc_wild")]
    names = list(dict.fromkeys(list(keys) + ["avg"] + per_kind))
    out = {k: _mean(s.get(k) for s in summaries) for k in names
           if any(k in s for s in summaries)}
    out["n"] = int(sum(s.get("n", 0) for s in summaries))
    return out


def _scoring_note(eval_metric: str, greedy: bool) -> str:
    if eval_metric == "ppl":
        return ("EasyEdit compute_edit_quality(eval_metric='ppl'): rel_ppl/gen_ppl = PPL of "
                "target_new after the prompt/paraphrase; loc = fraction of locality argmax "
                "tokens unchanged vs the unedited model")
    note = ("EasyEdit compute_edit_quality(eval_metric='token_em'): rel/gen = teacher-forced "
            "token accuracy of target_new after the prompt/paraphrase (rewrite_acc/"
            "rephrase_acc); loc = fraction of locality argmax tokens unchanged vs the "
            "unedited model")
    if greedy:
        note += ("; rel_em/gen_em = greedy whole-target exact match; loc_em = greedy "
                 "locality continuation identical to the unedited model's; rel_wild/"
                 "gen_wild = greedy generation gives the target and then the end token "
                 "(stops on its own); loc_wild = locality continuation one token past the "
                 "answer identical to the unedited model's")
    return note


def score_requests(model, tok, hparams, requests: Sequence[dict], *, unedited=None,
                   greedy: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Score ``requests`` on ``model`` with this module's metrics, without editing.

    Locality compares against ``unedited`` (default: ``model`` itself, so Loc is 1 by
    definition). Returns ``{"summary": ..., "per_edit": [...]}``.
    """
    requests = list(requests)
    scorer = Scorer(tok, scoring_hparams(hparams, model), "token_em", greedy, progress,
                    _model_device(model))
    scorer.prepare(model if unedited is None else unedited, requests)
    per_edit = scorer.score(model, requests, range(len(requests)))
    return {"summary": _summary(per_edit, METRIC_KEYS), "per_edit": per_edit}
