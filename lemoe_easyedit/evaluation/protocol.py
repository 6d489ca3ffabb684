"""One lifelong-editing protocol for every method: apply all T edits, then score every edit.

EasyEdit's own ``edit(..., sequential_edit=...)`` has been read in two ways (score each edit
right after it is made, or after all of them). This module fixes one reading, the WISE /
LEMoE one, and runs every method through it the same way:

1. **Editing.** The method's registered EasyEdit function ``ALG_DICT[name]`` is called as
   ``fn(model, tok, requests, hparams, copy=False, return_orig_weights=False,
   keep_original_weight=False)``, so edits accumulate in the model, in stream order:

   * *single-edit methods* (ROME, FT, GRACE, KN, ... and any method EasyEdit does not list as
     batchable, or whose ``batch_size`` is 1) get **one request per call**;
   * *batch methods* (EasyEdit's ``BatchEditor.is_batchable_method``: MEMIT, FT, LEMoE...)
     with ``hparams.batch_size > 1`` get **consecutive chunks of ``batch_size`` requests**.
     FT is batchable in EasyEdit; its YAML files here set ``batch_size: 1`` (sequential
     FT-L, as in WISE). LEMoE's YAML files set ``batch_size`` to at least T, so LEMoE sees the
     whole stream at once and plans it into experts (its order planning).

   :func:`~.methods.edit_calls` gives the exact call boundaries; they are stored in the
   results.
2. **Scoring, after all T edits, on the final model**, every edit of the stream, with the
   metrics of :mod:`.scoring` (locality against the unedited model, computed once before
   any edit).
3. **T smaller than the data.** The first ``num_edits`` requests are cut into consecutive
   chunks of ``chunk_size`` (= T); every chunk starts from the unedited model
   (:class:`UneditedModels`) and is scored as above; the summary is the mean over chunks.
   ``num_edits`` must be a multiple of T.
4. **Checkpoints** (optional, every k edits): after k, 2k, ... edits of a chunk, every edit
   seen so far is scored on the current model: Rel/Gen/Loc as a function of edits so far.
   The model at a checkpoint may only have seen the edits so far, so a batch method's calls
   are also cut at multiples of k (calls of at most ``min(batch_size, k)`` edits). A batch
   method with checkpoints therefore receives its stream in k-sized installments, which can
   differ from a run without them; ``protocol.edit_calls`` records what happened.

Every summary metric is the mean over edits (then over chunks) of per-edit scores;
``avg`` is the mean of ``rel``, ``gen`` and ``loc`` (those present), as in the papers.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .methods import _alg_dict, _ensure_method, edit_calls, edit_mode, implementation_of
from .models import _cpu_copy, _model_device, _n_params, load_model_and_tokenizer
from .provenance import _hparams_dict, _jsonable, _method_state, package_versions
from .scoring import (METRIC_KEYS, PPL_KEYS, Scorer, _average_summaries, _scoring_note,
                      _summary, scoring_hparams)

PROTOCOL_VERSION = "lemoe-easyedit lifelong protocol v1 (edit all T, then score all T)"


class UneditedModels:
    """A fresh unedited model for every chunk, under one restore mode.

    * a model given by the caller is never edited: every chunk edits a deep copy of it;
    * ``"copy"``: the loaded model edits chunk 0; an unedited copy kept in CPU memory (made
      before any edit) is copied onto the device for each later chunk;
    * ``"reload"``: each later chunk loads the model from disk, after the previous chunk's
      model is dropped (two 7B models need not fit at once);
    * ``"auto"``: ``"copy"`` below 10^9 parameters, else ``"reload"``; a device-mapped
      (``model_parallel``) model is reloaded, since a copy would lose its device map.
    """

    def __init__(self, hparams, model=None, tok=None, restore: str = "auto",
                 n_chunks: int = 1):
        if restore not in ("auto", "copy", "reload"):
            raise ValueError(f"restore must be auto, copy or reload, got {restore!r}")
        if model is not None and tok is None:
            raise ValueError("a model was given without its tokenizer")
        self.hparams = hparams
        self.from_caller = model is not None
        if not self.from_caller:
            model, tok = load_model_and_tokenizer(hparams)
        if restore == "auto":
            restore = "copy" if _n_params(model) < 1e9 else "reload"
        if restore == "copy" and getattr(hparams, "model_parallel", False) \
                and not self.from_caller:
            restore = "reload"
        self.restore, self.model, self.tok = restore, model, tok
        self.device = _model_device(model)
        self._kept = None
        if restore == "copy" and n_chunks > 1 and not self.from_caller:
            self._kept = _cpu_copy(model, self.device)

    def for_chunk(self, c: int):
        """The unedited model that chunk ``c`` edits (the caller drops the previous one)."""
        if self.from_caller:
            return copy.deepcopy(self.model)
        if c == 0:
            return self.model
        if self.restore == "copy":
            return copy.deepcopy(self._kept).to(self.device)
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.model, _ = load_model_and_tokenizer(self.hparams)
        return self.model


@dataclass
class _Stream:
    """One method's pass over the edit stream: what every chunk needs."""

    method: str
    apply_fn: Callable
    hparams: Any
    tok: Any
    requests: List[dict]
    scorer: Scorer
    calls: List[Tuple[int, int]]
    T: int
    checkpoint_every: Optional[int]
    keys: Sequence[str]
    seed: int
    progress: bool
    quiet: bool
    log: Any
    #: appended to every ``target_new`` handed to the method (never to what is scored)
    end_token: Optional[str] = None

    def _for_method(self, request: dict) -> dict:
        """A copy of ``request`` as the method edits it: with ``end_token`` after the target,
        so that an editor learns to stop after the new object as the model stops after
        its facts (what the WILD scores measure)."""
        r = dict(request)
        if self.end_token:
            r["target_new"] = r["target_new"] + self.end_token
        return r

    def edit_and_score(self, c: int, n_chunks: int, model) -> dict:
        """Apply chunk ``c``'s T edits to ``model`` in calls, scoring at checkpoints, then
        score every edit of the chunk on the final model."""
        lo, hi = c * self.T, (c + 1) * self.T
        _set_seed(self.seed)
        marks = set(range(self.checkpoint_every, self.T, self.checkpoint_every)) \
            if self.checkpoint_every else set()
        edit_s = eval_s = 0.0
        checkpoints = []
        bar = tqdm(total=self.T, desc=f"{self.method} edits (chunk {c + 1}/{n_chunks})",
                   disable=not self.progress, leave=False)
        for start, end in self.calls:
            t0 = time.time()
            with _quiet(self.quiet, self.log):
                model, _ = self.apply_fn(
                    model, self.tok,
                    [self._for_method(r) for r in self.requests[lo + start:lo + end]],
                    self.hparams, copy=False, return_orig_weights=False,
                    keep_original_weight=False)
            edit_s += time.time() - t0
            bar.update(end - start)
            if end in marks:
                t0 = time.time()
                scores = self._score(model, range(lo, lo + end), f"checkpoint {end}")
                eval_s += time.time() - t0
                checkpoints.append({"edits": end, **_summary(scores, self.keys)})
        bar.close()
        t0 = time.time()
        scores = self._score(model, range(lo, hi), f"scoring chunk {c + 1}")
        eval_s += time.time() - t0
        for m in scores:
            m["chunk"] = c
        summary = _summary(scores, self.keys)
        checkpoints.append({"edits": self.T, **summary})
        return {"chunk": c, "start": lo, "end": hi, "summary": summary,
                "checkpoints": checkpoints, "edit_s": edit_s, "eval_s": eval_s,
                "method_state": _method_state(model),
                "edit_order": [self.requests[i].get("case_id", i) for i in range(lo, hi)],
                "per_edit": scores}

    def _score(self, model, indices: range, desc: str) -> List[dict]:
        if hasattr(model, "eval"):
            model.eval()
        return self.scorer.score(model, self.requests, indices, desc=desc)


def run_protocol(method: str, hparams, requests: Sequence[dict], *,
                 model=None, tok=None, chunk_size: Optional[int] = None,
                 checkpoint_every: Optional[int] = None, eval_metric: str = "token_em",
                 greedy: bool = True, seed: int = 0, restore: str = "auto",
                 progress: bool = True, quiet: bool = True, log=None,
                 data_info: Optional[dict] = None,
                 edit_end_token: bool = False) -> Dict[str, Any]:
    """Run ``method`` over ``requests`` under the protocol of this module; return results.

    ``requests``: the edit stream (all of it is used; ``len(requests)`` must be a multiple
    of ``chunk_size``, default ``len(requests)``). ``model``/``tok``: a loaded model to copy
    for every chunk (it is never edited); default: loaded from ``hparams.model_name``.
    ``restore`` between chunks: see :class:`UneditedModels`. ``eval_metric``:
    ``"token_em"`` or ``"ppl"``. ``greedy``: also score greedy exact match. ``quiet``: send
    the editing functions' prints to ``log`` (a text stream) or nowhere.
    ``edit_end_token``: the method edits ``target_new`` followed by the tokenizer's end
    token (``tok.eos_token``), for models that end every fact with it; scoring always uses
    ``target_new`` as given.

    Returns a JSON-serialisable dict: ``summary``, ``per_edit``, ``chunks``,
    ``checkpoints``, ``protocol``, ``method``, ``implementation``, ``hparams``,
    ``versions``, ``seed``, ``edit_order``, ``timings``, ``data``.
    """
    requests = list(requests)
    T, n_chunks = _check_arguments(requests, chunk_size, checkpoint_every, eval_metric,
                                   restore)
    _ensure_method(method)
    mode, batch_size = edit_mode(method, hparams)
    calls = edit_calls(T, mode, batch_size, checkpoint_every)
    t_start = time.time()

    # The unedited model, and its locality answers, before any edit.
    models = UneditedModels(hparams, model, tok, restore, n_chunks)
    load_s = time.time() - t_start
    scorer = Scorer(models.tok, scoring_hparams(hparams, models.model), eval_metric, greedy,
                    progress, models.device)
    t0 = time.time()
    scorer.prepare(models.model, requests)
    pre_s = time.time() - t0

    stream = _Stream(method, _alg_dict()[method], hparams, models.tok, requests, scorer,
                     calls, T, checkpoint_every, PPL_KEYS if eval_metric == "ppl"
                     else METRIC_KEYS, seed, progress, quiet, log,
                     end_token=_end_token(models.tok) if edit_end_token else None)
    chunks = []
    for c in range(n_chunks):
        t0 = time.time()
        fresh = models.for_chunk(c)
        load_s += time.time() - t0
        chunks.append(stream.edit_and_score(c, n_chunks, fresh))
        del fresh  # so that "reload" never holds two models

    per_edit = [m for ch in chunks for m in ch.pop("per_edit")]
    edit_s = sum(ch["edit_s"] for ch in chunks)
    return _jsonable({
        "method": method,
        "implementation": implementation_of(method),
        "scoring": _scoring_note(eval_metric, greedy),
        "summary": _average_summaries([ch["summary"] for ch in chunks], stream.keys),
        "checkpoints": _curve(chunks, stream.keys),
        "chunks": chunks,
        "per_edit": per_edit,
        "protocol": {
            "version": PROTOCOL_VERSION,
            "num_edits": len(requests), "chunk_size": T, "n_chunks": n_chunks,
            "checkpoint_every": checkpoint_every, "edit_mode": mode,
            "batch_size": batch_size, "edit_calls": [list(x) for x in calls],
            "eval_metric": eval_metric,
            "greedy_exact_match": bool(greedy and eval_metric != "ppl"),
            "restore": models.restore if n_chunks > 1 or models.from_caller
            else "none (one chunk)",
            "scoring_max_length": scorer.hparams.max_length,
            "edit_end_token": stream.end_token,
        },
        "hparams": _hparams_dict(hparams),
        "versions": package_versions(),
        "seed": seed,
        "edit_order": {
            "stream": [r.get("case_id", i) for i, r in enumerate(requests)],
            "note": "case_ids in the order given to the method; chunks[*].method_state."
                    "lemoe_plans holds LEMoE's planned batches (indices into each call's "
                    "requests)",
        },
        "timings": {"edit_s": edit_s, "eval_s": sum(ch["eval_s"] for ch in chunks),
                    "unedited_locality_s": pre_s, "load_s": load_s,
                    "total_s": time.time() - t_start,
                    "edit_s_per_edit": edit_s / len(requests)},
        "device": str(models.device),
        "data": data_info or {},
    })


def _end_token(tok) -> str:
    token = getattr(tok, "eos_token", None)
    if not token:
        raise ValueError("edit_end_token needs a tokenizer with an end token (eos_token)")
    return token


def _check_arguments(requests: List[dict], chunk_size: Optional[int],
                     checkpoint_every: Optional[int], eval_metric: str,
                     restore: str) -> Tuple[int, int]:
    """``(T, number of chunks)``, or ValueError naming the bad argument."""
    if eval_metric not in ("token_em", "ppl"):
        raise ValueError(f"eval_metric must be 'token_em' or 'ppl', got {eval_metric!r}")
    if restore not in ("auto", "copy", "reload"):
        raise ValueError(f"restore must be auto, copy or reload, got {restore!r}")
    if not requests:
        raise ValueError("no requests to edit")
    n = len(requests)
    T = int(chunk_size or n)
    if T <= 0 or n % T:
        raise ValueError(f"the number of edits ({n}) must be a positive multiple of the chunk "
                         f"size T={T}; use --num-edits {max(T, n - n % T)}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise ValueError("checkpoint_every must be a positive integer")
    return T, n // T


def _curve(chunks: Sequence[dict], keys: Sequence[str]) -> List[dict]:
    """Checkpoint summaries averaged over chunks, by number of edits."""
    marks = sorted({cp["edits"] for ch in chunks for cp in ch["checkpoints"]})
    return [{"edits": mark, **_average_summaries(
        [cp for ch in chunks for cp in ch["checkpoints"] if cp["edits"] == mark], keys)}
        for mark in marks]


def _quiet(enabled: bool, sink: Optional[io.TextIOBase]):
    """Send the editing functions' prints (ROME/MEMIT/FT print per step) to ``sink``."""
    if not enabled:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    target = sink if sink is not None else open(os.devnull, "w")
    if sink is None:
        stack.callback(target.close)
    stack.enter_context(contextlib.redirect_stdout(target))
    return stack


def _set_seed(seed: int) -> None:
    # The protocol runs in its own process (runner); every method starts each chunk from
    # the same global seed, as EasyEdit's scripts do.
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
