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

   :func:`edit_calls` gives the exact call boundaries; they are stored in the results.
2. **Scoring, after all T edits, on the final model**, every edit of the stream:

   * ``rel`` / ``gen``: EasyEdit's ``compute_edit_quality`` (``rewrite_acc`` /
     ``rephrase_acc``): teacher-forced token accuracy of the target after the prompt /
     paraphrase (``prompt + " " + target`` fed once, argmax compared per target token);
   * ``loc``: fraction of the locality prompt's argmax tokens (over the locality answer's
     positions, EasyEdit's ``*_output``) equal to those of the **unedited** model. The
     unedited model's tokens are computed once, before any edit;
   * ``rel_em`` / ``gen_em``: whole-target greedy exact match: ``len(target tokens)`` tokens
     are generated greedily after the prompt and must equal the target tokens (the same
     tokens EasyEdit scores: ``tok(prompt + " " + target)`` after ``tok(prompt)``). A user
     sees this; token accuracy gives partial credit for a wrong answer;
   * ``loc_em``: the greedy continuation of the locality prompt (as many tokens as its
     answer) is identical to the unedited model's;
   * with ``eval_metric="ppl"`` (hallucination data) ``rel_ppl`` / ``gen_ppl`` are EasyEdit's
     ``PPL`` of ``target_new`` (``compute_edit_quality(..., eval_metric="ppl")``) instead of
     the accuracies and exact matches; ``loc`` is scored as above.

   Scoring never truncates: the metric functions receive a copy of the hparams whose
   ``max_length`` is the model's context length (the method's own ``max_length`` still
   applies to its editing); EasyEdit would otherwise score a truncated sequence.
3. **T smaller than the data.** The first ``num_edits`` requests are cut into consecutive
   chunks of ``chunk_size`` (= T); every chunk starts from the unedited model (a fresh copy
   in memory, or reloaded from disk for big models, see ``restore``) and is scored as above;
   the summary is the mean over chunks. ``num_edits`` must be a multiple of T.
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
import importlib.metadata
import io
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import compat

__all__ = [
    "PROTOCOL_VERSION",
    "METRIC_KEYS",
    "edit_calls",
    "load_tokenizer",
    "edit_mode",
    "implementation_of",
    "load_hparams",
    "load_model_and_tokenizer",
    "package_versions",
    "run_protocol",
    "greedy_generate",
    "target_token_ids",
    "summary_table",
]

PROTOCOL_VERSION = "lemoe-easyedit lifelong protocol v1 (edit all T, then score all T)"
#: Per-edit metrics in [0, 1] (token_em) and the perplexities (ppl).
METRIC_KEYS = ("rel", "gen", "loc", "rel_em", "gen_em", "loc_em")
PPL_KEYS = ("rel_ppl", "gen_ppl", "loc")

compat.load_easyeditor()


# ----------------------------------------------------------------------- methods


def _alg_dict() -> Dict[str, Callable]:
    from easyeditor.util.alg_dict import ALG_DICT

    return ALG_DICT


def _ensure_method(method: str) -> None:
    """Import what registers ``method`` (LEMoE; the project's GRACE when EasyEdit lacks it)."""
    if method == "LEMoE":
        import lemoe_easyedit  # noqa: F401  (registers LEMoE)
    elif method == "GRACE":
        from . import grace  # noqa: F401  (registers GRACE only when EasyEdit has none)
    if method not in _alg_dict():
        raise ValueError(f"method {method!r} is not registered in EasyEdit's ALG_DICT; "
                         f"available: {', '.join(sorted(_alg_dict()))}")


def implementation_of(method: str) -> str:
    """Which code runs ``method``: the installed EasyEdit's, or this project's."""
    _ensure_method(method)
    fn = _alg_dict()[method]
    module = getattr(fn, "__module__", "") or ""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        module = getattr(inner, "__module__", module) or module
    ee = _easyeditor_version()
    if module.startswith("lemoe_easyedit"):
        return f"lemoe_easyedit ({module}.{getattr(fn, '__name__', '?')})"
    return f"easyeditor {ee} ({module}.{getattr(fn, '__name__', '?')})"


def _hparams_class(method: str):
    _ensure_method(method)
    if method == "LEMoE":
        from .hparams import LEMoEHyperParams

        return LEMoEHyperParams
    import easyeditor

    names = {"GRACE": ["GraceHyperParams"], "FT": ["FTHyperParams"],
             "ROME": ["ROMEHyperParams"], "MEMIT": ["MEMITHyperParams"],
             "KN": ["KNHyperParams"], "LoRA": ["LoRAHyperParams"],
             "MEND": ["MENDHyperParams"], "SERAC": ["SERACHparams"],
             "IKE": ["IKEHyperParams"], "WISE": ["WISEHyperParams"],
             "MELO": ["MELOHyperParams"], "AlphaEdit": ["AlphaEditHyperParams"]}
    for name in names.get(method, []) + [f"{method}HyperParams"]:
        cls = getattr(easyeditor, name, None)
        if cls is not None:
            return cls
    if method == "GRACE":
        from .grace import GraceHyperParams

        return GraceHyperParams
    raise ValueError(f"no hyper-parameter class found for method {method!r}")


def load_hparams(method: str, path: str, **overrides: Any):
    """Load ``path`` with the method's EasyEdit hparams class, then apply ``overrides``
    (None values are ignored). ``alg_name`` in the file must be ``method``."""
    import yaml

    cls = _hparams_class(method)
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of hparams")
    if config.get("alg_name") != method:
        raise ValueError(f"{path}: alg_name is {config.get('alg_name')!r}, not {method!r}")
    hparams = cls.from_hparams(str(path))
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(hparams, key):
            raise ValueError(f"{method} hparams have no field {key!r} to override")
        setattr(hparams, key, value)
    return hparams


def edit_mode(method: str, hparams) -> Tuple[str, int]:
    """``("batch", batch_size)`` for a batchable method with ``batch_size > 1``, else
    ``("sequential", 1)`` (see the module docstring)."""
    _ensure_method(method)
    size = getattr(hparams, "batch_size", 1)
    size = int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else 1
    try:
        from easyeditor.editors.batch_editor import BatchEditor

        batchable = bool(BatchEditor.is_batchable_method(method))
    except ImportError:  # pragma: no cover - every EasyEdit form has it
        batchable = False
    if batchable and size > 1:
        return "batch", size
    return "sequential", 1


def edit_calls(n: int, mode: str, batch_size: int,
               checkpoint_every: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[(start, end), ...]``: the requests of each edit call over a chunk of ``n`` edits."""
    step = 1 if mode == "sequential" else max(1, batch_size)
    calls, start = [], 0
    while start < n:
        end = min(n, start + step)
        if checkpoint_every:
            next_cp = (start // checkpoint_every + 1) * checkpoint_every
            end = min(end, next_cp)
        calls.append((start, end))
        start = end
    return calls


# ----------------------------------------------------------------------- models


def load_model_and_tokenizer(hparams, model_name: Optional[str] = None, on_device: bool = True):
    """Load the model and tokenizer of ``hparams`` as EasyEdit's ``BaseEditor`` does here
    (Auto classes, float32 unless the hparams ask otherwise, pad token = eos when missing,
    right padding for ROME/MEMIT and left otherwise), on ``resolve_device(hparams.device)``
    (``model_parallel``: ``device_map="auto"``). Writes no log file."""
    import transformers
    from transformers import AutoModelForCausalLM

    name = _model_name(hparams, model_name)
    major = int(transformers.__version__.split(".")[0])
    dtype_key = "dtype" if major >= 5 else "torch_dtype"
    parallel = bool(getattr(hparams, "model_parallel", False))
    kwargs = {dtype_key: compat.hparams_dtype(hparams)}
    if parallel and on_device:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.eval()
    tok = load_tokenizer(hparams, name)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if hparams.alg_name in ("ROME", "MEMIT") else "left"
    if on_device and not parallel:
        model.to(compat.resolve_device(getattr(hparams, "device", None)))
    return model, tok


def _model_name(hparams, model_name: Optional[str] = None) -> str:
    name = model_name or hparams.model_name
    if not isinstance(name, str):
        raise ValueError(f"hparams.model_name must be a path or hub name, got {name!r}")
    return name


def load_tokenizer(hparams, model_name: Optional[str] = None):
    """The tokenizer of ``hparams.model_name`` (or ``model_name``), as loaded for editing."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_name(hparams, model_name))


def _model_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _context_length(model, default: int = 2048) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _cpu_copy(model, device: torch.device):
    """A copy of ``model`` in CPU memory, made without a second copy on the accelerator."""
    if device.type == "cpu":
        return copy.deepcopy(model)
    model.cpu()
    try:
        return copy.deepcopy(model)
    finally:
        model.to(device)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------- versions


def _easyeditor_version() -> str:
    try:
        version = importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version} ({'release' if compat.is_release() else 'upstream checkout'})"


def package_versions() -> Dict[str, str]:
    import transformers

    import lemoe_easyedit

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "easyeditor": _easyeditor_version(),
        "lemoe_easyedit": getattr(lemoe_easyedit, "__version__", "unknown"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    commit = _git_commit()
    if commit:
        out["lemoe_easyedit_git"] = commit
    return out


def _git_commit() -> Optional[str]:
    """``<commit>[+dirty]`` of the checkout this package runs from, if it is one."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--",
                                "lemoe_easyedit", "hparams"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


# ----------------------------------------------------------------------- scoring helpers


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


@dataclass
class _Scorer:
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
            # One batched greedy generation for every probe (as score() does).
            lengths = [len(target_token_ids(self.tok, p, g)[1]) for _, _, p, g in jobs]
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
        wanted = [target_token_ids(self.tok, p, t)[1] for _, _, p, t in jobs]
        gens = greedy_generate(model, self.tok, [p for _, _, p, _ in jobs],
                               [len(w) for w in wanted])
        loc_em: Dict[int, List[float]] = {}
        for (pos, key, _, _), want, got in zip(jobs, wanted, gens):
            m = out[pos]
            if key.startswith("loc_em:"):
                probe = key.split(":", 1)[1]
                pre = self.pre_loc_gen[m["index"]].get(probe)
                if pre is not None:
                    loc_em.setdefault(pos, []).append(float(list(pre) == list(got)))
                    m[f"loc_em:{probe}"] = loc_em[pos][-1]
            else:
                m[key] = float(len(want) > 0 and list(got) == list(want))
        for m_pos, m in enumerate(out):
            m.setdefault("rel_em", None)
            if requests[m["index"]].get("rephrase_prompt"):
                m.setdefault("gen_em", None)
            else:
                m["gen_em"] = None
            m["loc_em"] = _mean(loc_em.get(m_pos, []))


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
    for prefix in ("loc", "loc_em"):
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
    per_kind = [f"{p}:{k}" for k in locality_kinds(summaries) for p in ("loc", "loc_em")]
    names = list(dict.fromkeys(list(keys) + ["avg"] + per_kind))
    out = {k: _mean(s.get(k) for s in summaries) for k in names
           if any(k in s for s in summaries)}
    out["n"] = int(sum(s.get("n", 0) for s in summaries))
    return out


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _method_state(model) -> Dict[str, Any]:
    """What the edited model holds, for the record (LEMoE experts and plans, GRACE keys)."""
    state: Dict[str, Any] = {}
    try:
        from .injection import find_adaptor

        layer = find_adaptor(model)
    except Exception:  # pragma: no cover - defensive: never fail a run for bookkeeping
        layer = None
    if layer is not None:
        state["lemoe_experts"] = len(layer.slots)
        state["lemoe_plans"] = _jsonable(getattr(layer, "plans", []))
    try:
        from .grace import find_grace

        g = find_grace(model)
    except Exception:
        g = None
    if g is not None:
        state["grace_keys"] = int(g.num_keys)
        state["grace_module"] = g.module_path
    return state


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def _hparams_dict(hparams) -> Dict[str, Any]:
    import dataclasses

    if hasattr(hparams, "to_dict"):
        try:
            return _jsonable(hparams.to_dict())
        except Exception:  # pragma: no cover
            pass
    if dataclasses.is_dataclass(hparams):
        out = {}
        for f in dataclasses.fields(hparams):
            v = getattr(hparams, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) \
                else repr(v)
        return _jsonable(out)
    return {k: repr(v) for k, v in vars(hparams).items()}


# ----------------------------------------------------------------------- the protocol


def run_protocol(method: str, hparams, requests: Sequence[dict], *,
                 model=None, tok=None, chunk_size: Optional[int] = None,
                 checkpoint_every: Optional[int] = None, eval_metric: str = "token_em",
                 greedy: bool = True, seed: int = 0, restore: str = "auto",
                 progress: bool = True, quiet: bool = True, log=None,
                 data_info: Optional[dict] = None) -> Dict[str, Any]:
    """Run ``method`` over ``requests`` under the protocol of this module; return results.

    ``requests``: the edit stream (all of it is used; ``len(requests)`` must be a multiple
    of ``chunk_size``, default ``len(requests)``). ``model``/``tok``: a loaded model to copy
    for every chunk (it is never edited); default: loaded from ``hparams.model_name``.
    ``restore`` between chunks: ``"copy"`` (keep the unedited model in CPU memory, edit a
    copy per chunk), ``"reload"`` (load it from disk per chunk), ``"auto"`` (copy below
    10^9 parameters). ``eval_metric``: ``"token_em"`` or ``"ppl"``. ``greedy``: also score
    greedy exact match. ``quiet``: send the editing functions' prints to ``log`` (a text
    stream) or nowhere.

    Returns a JSON-serialisable dict: ``summary``, ``per_edit``, ``chunks``,
    ``checkpoints``, ``protocol``, ``method``, ``implementation``, ``hparams``,
    ``versions``, ``seed``, ``edit_order``, ``timings``, ``data``.
    """
    if eval_metric not in ("token_em", "ppl"):
        raise ValueError(f"eval_metric must be 'token_em' or 'ppl', got {eval_metric!r}")
    if restore not in ("auto", "copy", "reload"):
        raise ValueError(f"restore must be auto, copy or reload, got {restore!r}")
    requests = list(requests)
    if not requests:
        raise ValueError("no requests to edit")
    n = len(requests)
    T = int(chunk_size or n)
    if T <= 0 or n % T:
        raise ValueError(f"the number of edits ({n}) must be a positive multiple of the chunk "
                         f"size T={T}; use --num-edits {max(T, n - n % T)}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise ValueError("checkpoint_every must be a positive integer")
    _ensure_method(method)
    apply_fn = _alg_dict()[method]
    mode, batch_size = edit_mode(method, hparams)
    calls = edit_calls(T, mode, batch_size, checkpoint_every)
    n_chunks = n // T
    t_start = time.time()

    # --- the unedited model --------------------------------------------------------
    load_s = 0.0
    caller_model = model is not None
    if caller_model and tok is None:
        raise ValueError("a model was given without its tokenizer")
    if not caller_model:
        t0 = time.time()
        model, tok = load_model_and_tokenizer(hparams)
        load_s += time.time() - t0
    if restore == "auto":
        restore = "copy" if _n_params(model) < 1e9 else "reload"
    if restore == "copy" and getattr(hparams, "model_parallel", False) and not caller_model:
        restore = "reload"  # a copy would lose the device map
    base = model
    device = _model_device(model)

    eval_hp = copy.copy(hparams)
    eval_hp.max_length = max(int(getattr(hparams, "max_length", 0) or 0),
                             _context_length(model))
    scorer = _Scorer(tok, eval_hp, eval_metric, greedy, progress, device)
    t0 = time.time()
    scorer.prepare(base, requests)
    pre_s = time.time() - t0

    keys = PPL_KEYS if eval_metric == "ppl" else METRIC_KEYS
    per_edit: List[dict] = []
    chunk_results: List[dict] = []
    edit_s_total = eval_s_total = 0.0
    for c in range(n_chunks):
        lo, hi = c * T, (c + 1) * T
        # --- a fresh unedited model for this chunk ---
        t0 = time.time()
        if caller_model:
            work = copy.deepcopy(base)
        elif n_chunks == 1 or c == 0:
            if n_chunks > 1 and restore == "copy":
                base = _cpu_copy(model, device)
            work = model
        elif restore == "copy":
            work = copy.deepcopy(base).to(device)
        else:
            # Drop every reference to the previous chunk's model before loading the next:
            # two 7B models need not fit at once.
            work = model = base = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            work, _ = load_model_and_tokenizer(hparams)
        load_s += time.time() - t0
        _set_seed(seed)

        chunk_edit_s = chunk_eval_s = 0.0
        checkpoints = []
        cp_marks = set(range(checkpoint_every, T + 1, checkpoint_every)) \
            if checkpoint_every else set()
        bar = tqdm(total=T, desc=f"{method} edits (chunk {c + 1}/{n_chunks})",
                   disable=not progress, leave=False)
        for start, end in calls:
            chunk_reqs = [dict(r) for r in requests[lo + start:lo + end]]
            t0 = time.time()
            with _quiet(quiet, log):
                work, _ = apply_fn(work, tok, chunk_reqs, hparams, copy=False,
                                   return_orig_weights=False, keep_original_weight=False)
            chunk_edit_s += time.time() - t0
            bar.update(end - start)
            if end in cp_marks and end < T:
                t0 = time.time()
                if hasattr(work, "eval"):
                    work.eval()
                scores = scorer.score(work, requests, range(lo, lo + end),
                                      desc=f"checkpoint {end}")
                chunk_eval_s += time.time() - t0
                checkpoints.append({"edits": end, **_summary(scores, keys)})
        bar.close()
        # --- score every edit of the chunk on the final model ---
        t0 = time.time()
        if hasattr(work, "eval"):
            work.eval()
        scores = scorer.score(work, requests, range(lo, hi), desc=f"scoring chunk {c + 1}")
        chunk_eval_s += time.time() - t0
        for m in scores:
            m["chunk"] = c
        per_edit.extend(scores)
        summary = _summary(scores, keys)
        checkpoints.append({"edits": T, **summary})
        state = _method_state(work)
        chunk_results.append({
            "chunk": c, "start": lo, "end": hi, "summary": summary,
            "checkpoints": checkpoints, "edit_s": chunk_edit_s, "eval_s": chunk_eval_s,
            "method_state": state,
            "edit_order": [requests[i].get("case_id", i) for i in range(lo, hi)],
        })
        edit_s_total += chunk_edit_s
        eval_s_total += chunk_eval_s

    # --- checkpoints averaged over chunks ---
    marks = sorted({cp["edits"] for ch in chunk_results for cp in ch["checkpoints"]})
    curve = []
    for mark in marks:
        rows = [cp for ch in chunk_results for cp in ch["checkpoints"] if cp["edits"] == mark]
        curve.append({"edits": mark, **_average_summaries(rows, keys)})

    summary = _average_summaries([ch["summary"] for ch in chunk_results], keys)
    return _jsonable({
        "method": method,
        "implementation": implementation_of(method),
        "scoring": _scoring_note(eval_metric, greedy),
        "summary": summary,
        "checkpoints": curve,
        "chunks": chunk_results,
        "per_edit": per_edit,
        "protocol": {
            "version": PROTOCOL_VERSION,
            "num_edits": n, "chunk_size": T, "n_chunks": n_chunks,
            "checkpoint_every": checkpoint_every, "edit_mode": mode,
            "batch_size": batch_size, "edit_calls": [list(x) for x in calls],
            "eval_metric": eval_metric, "greedy_exact_match": bool(greedy and
                                                                   eval_metric != "ppl"),
            "restore": restore if n_chunks > 1 or caller_model else "none (one chunk)",
            "scoring_max_length": eval_hp.max_length,
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
        "timings": {"edit_s": edit_s_total, "eval_s": eval_s_total,
                    "unedited_locality_s": pre_s, "load_s": load_s,
                    "total_s": time.time() - t_start,
                    "edit_s_per_edit": edit_s_total / n},
        "device": str(device),
        "data": data_info or {},
    })


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
                 "locality continuation identical to the unedited model's")
    return note


# ----------------------------------------------------------------------- tables


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_table(results: Sequence[dict]) -> str:
    """A markdown table of several results dicts (one row per method)."""
    ppl = any(r.get("protocol", {}).get("eval_metric") == "ppl" for r in results)
    kinds = locality_kinds([r.get("summary", {}) for r in results])
    loc = [f"loc:{k}" for k in kinds]
    cols = (["rel_ppl", "gen_ppl", "loc"] + loc if ppl else
            ["rel", "gen", "loc"] + loc + ["avg", "rel_em", "gen_em", "loc_em"]
            + [f"loc_em:{k}" for k in kinds])
    head = ["method"] + cols + ["T", "chunks", "edit s", "eval s", "implementation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, p, t = r.get("summary", {}), r.get("protocol", {}), r.get("timings", {})
        row = [r.get("method", "?")] + [_fmt(s.get(c)) for c in cols] + [
            _fmt(p.get("chunk_size")), _fmt(p.get("n_chunks")),
            _fmt(t.get("edit_s"), 1), _fmt(t.get("eval_s"), 1),
            r.get("implementation", "?")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def score_requests(model, tok, hparams, requests: Sequence[dict], *, unedited=None,
                   greedy: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Score ``requests`` on ``model`` with this module's metrics, without editing.

    Locality compares against ``unedited`` (default: ``model`` itself, so Loc is 1 by
    definition). Returns ``{"summary": ..., "per_edit": [...]}``.
    """
    requests = list(requests)
    device = _model_device(model)
    eval_hp = copy.copy(hparams)
    eval_hp.max_length = max(int(getattr(hparams, "max_length", 0) or 0), _context_length(model))
    scorer = _Scorer(tok, eval_hp, "token_em", greedy, progress, device)
    scorer.prepare(model if unedited is None else unedited, requests)
    per_edit = scorer.score(model, requests, range(len(requests)))
    return {"summary": _summary(per_edit, METRIC_KEYS), "per_edit": per_edit}
