"""Performance benchmark: editing cost, serving cost and memory of LEMoE against baselines.

::

    python benchmarks/bench.py --out bench-results            # the testbed, full size
    python benchmarks/bench.py --model PATH --out DIR         # any supported causal LM
    python -m lemoe_easyedit.bench --help

One run, on one model and one list of edits, measures

* **editing cost**: seconds per edit and edits per second of LEMoE, ROME, MEMIT, GRACE and FT
  (each method in its own subprocess, edits given as the evaluation protocol gives them:
  LEMoE all T edits in calls of its ``batch_size``, the others one edit per call unless
  batchable with ``batch_size > 1``), their ratio to LEMoE's, each process's peak resident
  memory and its resident memory above the loaded model after editing. LEMoE's figure is
  at ``T = max(--stream)``; GRACE is timed over ``--grace-edits`` (default the same T),
  ROME, MEMIT and FT over ``--baseline-edits`` (their cost per edit does not grow). Each
  time is the fastest of ``--rounds`` rounds: later rounds time every method's editing
  again, one method after the other, so that a slow spell of a shared machine (minutes
  long on this project's CI machine) does not land on one method alone;
* **growth of LEMoE's cost with the stream**: the time per edit of each ``T`` in
  ``--stream`` (protocol mode, fresh model each; a shorter ``T`` on each of the ``T``-edit
  blocks of the longest stream, so that every ``T`` edits the same facts, the longest run
  halfway through those blocks; each ``T``'s fastest round), and the marginal time per edit
  over the ``--window`` edits before each ``T`` when the stream arrives in installments of
  ``--edits-per-expert`` edits (one call, one expert each; each window's fastest round);
* **serving cost**: when the installments have made 1, 5, 20, 100 (``--experts``) experts,
  the forward latency (one prompt at a time, and one padded batch) and the greedy
  generation throughput of the edited model relative to the unedited one, interleaved in
  the same process (the adaptor is swapped out and back in between timings);
* **memory after editing**: resident memory and live tensor bytes above the loaded model
  after the installments, against the bytes of the experts (expert, routing projection,
  key, anchors, flag). The baseline is the loaded model with a runtime that has already
  run this stream once (its edits made and taken out again): the runtime's own pools grow
  with the shapes it meets (MKL keeps a buffer for every new GEMM shape, base model or
  not), and they are the run's, not the edited model's. The figures from the cold baseline
  (one warm-up call) are reported beside them;
* **cached-activation training**: the same expert batches trained with
  ``cached_activations`` true and false from the same state: time ratio, and the largest
  difference of per-step losses and of final weights.

Figures go to ``OUT/bench.json`` and ``OUT/bench.md``; each subprocess's output to
``OUT/logs``. The testbed (``lemoe_easyedit/testbed_assets``) is the default model, with
its edit set and ``hparams/<METHOD>/testbed-llama.yaml`` where those exist; any other model
gets hyper-parameters written from the model-family table (``OUT/hparams``) and synthetic
edits unless ``--data-path`` gives a JSON list of requests. Without the testbed a tiny
LLaMA of the testbed's shape is built. Timings depend on the machine: compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
METHODS = ("LEMoE", "ROME", "MEMIT", "GRACE", "FT")
BASELINES = ("ROME", "MEMIT", "GRACE", "FT")
TESTBED_HPARAMS = "testbed-llama"

__all__ = ["add_arguments", "bench_command", "main", "run_bench", "TARGETS"]


# ----------------------------------------------------------------------- arguments


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by ``lemoe-easyedit bench``)."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="model directory or hub name (default: the embedded testbed; a tiny "
                        "LLaMA of its shape is built if it is missing)")
    g.add_argument("--data-path", default=None,
                   help="JSON list of EasyEdit requests (default: the testbed's edit set, or "
                        "synthetic edits for another model)")
    g.add_argument("--hparams-name", default=None,
                   help="use hparams/<METHOD>/<NAME>.yaml where it exists (default: "
                        f"{TESTBED_HPARAMS} for the testbed); other methods get generated "
                        "hparams")
    g.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"methods to time (default: {' '.join(METHODS)}); LEMoE is always run")
    s = parser.add_argument_group("sizes")
    s.add_argument("--stream", type=_int_list, default=[100, 1000], metavar="T1,T2",
                   help="LEMoE stream lengths at which the time per edit is reported; the "
                        "stream runs to the largest (default: 100,1000)")
    s.add_argument("--window", type=int, default=100,
                   help="edits before each T over which its time per edit is averaged "
                        "(default 100, at most the smallest T)")
    s.add_argument("--edits-per-expert", type=int, default=10,
                   help="edits per LEMoE call, one expert each (default 10: 100 experts at "
                        "T=1000)")
    s.add_argument("--experts", type=_int_list, default=[1, 5, 20, 100], metavar="N1,N2",
                   help="numbers of experts at which serving cost is measured "
                        "(default: 1,5,20,100)")
    s.add_argument("--baseline-edits", type=int, default=100,
                   help="edits timed for ROME, MEMIT and FT (default 100: their cost per edit "
                        "does not depend on how many edits came before)")
    s.add_argument("--grace-edits", type=int, default=None,
                   help="edits timed for GRACE (default: the longest --stream; its codebook "
                        "grows with the stream)")
    s.add_argument("--train-edits", type=int, default=100,
                   help="edits trained both ways to compare cached-activation and "
                        "full-forward training (default 100)")
    s.add_argument("--latency-prompts", type=int, default=16,
                   help="prompts timed per latency measurement (half edited, half not)")
    s.add_argument("--gen-tokens", type=int, default=16, help="tokens generated per prompt")
    s.add_argument("--repeats", type=int, default=30,
                   help="interleaved repetitions of each latency measurement (best taken; "
                        "default 30)")
    s.add_argument("--rounds", type=int, default=2,
                   help="rounds of editing timings: after the first round (every method's "
                        "whole job), each later round times every method's editing again "
                        "(same edits, fresh model), in the same order; each method's time "
                        "is its fastest round (default 2)")
    r = parser.add_argument_group("run")
    r.add_argument("--out", default="bench-results", help="output directory")
    r.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every process (default 1; recorded)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=int, default=7200,
                   help="seconds allowed to each subprocess")
    r.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the peak
        return _peak_rss_bytes()


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _anon_rss_bytes() -> Optional[int]:
    """Resident anonymous memory (heap and other private allocations) of this process.

    Unlike the whole RSS it leaves out file-backed pages: the code of torch's shared
    libraries is paged in as new kernels first run, which grows the RSS by megabytes without
    allocating anything.
    """
    return _status_bytes("RssAnon")


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started.

    On Linux ``VmHWM`` (``ru_maxrss`` would include the parent's peak from before exec).
    """
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _settle() -> None:
    """Collect garbage and hand freed heap pages back, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.is_meta:
                    continue
                st = obj.untyped_storage()
                key = (st.device.type, st.data_ptr())
            except Exception:  # noqa: BLE001 - odd tensor subclasses
                continue
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def _memory_point() -> Dict[str, int]:
    _settle()
    return {"rss": _rss_bytes(), "anon": _anon_rss_bytes(), "tensors": _live_tensor_bytes()}


def _rewrite_accuracy(model, tok, requests: Sequence[dict], batch: int = 32) -> float:
    """Teacher-forced accuracy of the target tokens after each prompt (EasyEdit's Rel)."""
    import torch

    from .training import _pad_id, collate, encode_edits

    hits = total = 0
    device = model.get_input_embeddings().weight.device
    for i in range(0, len(requests), batch):
        edits = encode_edits(tok, requests[i:i + batch], 10 ** 6)
        b = collate(edits, _pad_id(tok), device)
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pred, lab = logits[:, :-1].argmax(-1), b.labels[:, 1:]
        m = lab != -100
        hits += int(((pred == lab) & m).sum())
        total += int(m.sum())
    return hits / max(total, 1)


# ----------------------------------------------------------------------- serving


@contextlib.contextmanager
def _unedited(model):
    """The model with its LEMoE adaptor swapped out (host FFN back, routing hook off)."""
    from .injection import find_adaptor
    from .model_families import get_submodule

    layer = find_adaptor(model)
    if layer is None:
        yield model
        return
    parent_path, name = layer.module_path.rsplit(".", 1)
    parent = get_submodule(model, parent_path)
    setattr(parent, name, layer.base_layer)
    layer.hook_handle.remove()
    try:
        yield model
    finally:
        setattr(parent, name, layer)
        layer.hook_handle = model.register_forward_pre_hook(layer.queries, with_kwargs=True)


def _serving(model, tok, prompts: Sequence[str], gen_tokens: int, repeats: int) -> dict:
    """Timings of the edited and the unedited model, finely interleaved.

    Every unit of work (one prompt's forward, the padded batch's forward, one prompt's
    generation) is timed ``repeats`` times with and without the adaptor, back to back in
    alternating order, and its best time is kept: on a shared machine the minimum is what
    the code costs, the rest is other processes.
    """
    import torch

    singles = [tok(p, return_tensors="pt") for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    batch = tok(list(prompts), return_tensors="pt", padding=True)
    tok.padding_side = side
    gens = singles[: max(1, len(singles) // 2)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def forward(x):
        return lambda: model(**x, use_cache=False)

    def generate(x):
        return lambda: model.generate(**x, max_new_tokens=gen_tokens,
                                      min_new_tokens=gen_tokens, do_sample=False,
                                      pad_token_id=pad)

    units = {"forward": [forward(x) for x in singles], "batch_forward": [forward(batch)],
             "generate": [generate(x) for x in gens]}
    totals = {}
    with torch.no_grad():
        for kind, fns in units.items():
            best = {False: [float("inf")] * len(fns), True: [float("inf")] * len(fns)}
            for rep in range(repeats + 1):  # round 0 warms up and is not counted
                for j, fn in enumerate(fns):
                    for edited in ((False, True) if (rep + j) % 2 else (True, False)):
                        with (contextlib.nullcontext() if edited else _unedited(model)):
                            t0 = time.perf_counter()
                            fn()
                            dt = time.perf_counter() - t0
                        if rep:
                            best[edited][j] = min(best[edited][j], dt)
            totals[kind] = (sum(best[False]), sum(best[True]))
    n_tok = gen_tokens * len(gens)
    (fb, fe), (bb, be), (gb, ge) = totals["forward"], totals["batch_forward"], totals["generate"]
    return {
        "forward_ms_base": 1e3 * fb / len(singles), "forward_ms": 1e3 * fe / len(singles),
        "forward_ratio": fe / fb,
        "batch_forward_ms_base": 1e3 * bb, "batch_forward_ms": 1e3 * be,
        "batch_forward_ratio": be / bb,
        "gen_tokens_per_s_base": n_tok / gb, "gen_tokens_per_s": n_tok / ge,
        "gen_ratio": gb / ge,
    }


# ----------------------------------------------------------------------- workers


def _load_job_hparams(job: dict):
    from .evaluation import load_hparams

    hp = load_hparams(job["method"], job["hparams"])
    hp.model_name = job["model"]
    if hasattr(hp, "stats_dir"):
        hp.stats_dir = job["stats_dir"]
    if hasattr(hp, "mom2_dataset"):
        hp.mom2_dataset = job["corpus"]
    if job["method"] == "LEMoE":
        hp.max_experts = None
    return hp


def _worker_setup(job: dict):
    import torch

    torch.set_num_threads(job["threads"])
    random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    from .evaluation import _ensure_method

    _ensure_method(job["method"])


def _baseline_worker(job: dict) -> dict:
    from easyeditor.util import nethook
    from easyeditor.util.alg_dict import ALG_DICT

    from .evaluation import edit_calls, edit_mode, load_model_and_tokenizer

    _worker_setup(job)
    method = job["method"]
    hp = _load_job_hparams(job)
    requests = json.loads(Path(job["requests"]).read_text())
    n = job["edits"]
    reqs, spare = requests[:n], requests[-1]
    model, tok = load_model_and_tokenizer(hp)
    apply_fn = ALG_DICT[method]
    base = _memory_point()
    warmup_s = 0.0
    if method in ("ROME", "MEMIT"):
        # The first call computes the layer's second-moment statistics (cached on disk after):
        # a one-off, like EasyEdit's precomputed Wikipedia statistics. Done on a spare edit,
        # rolled back, and not counted.
        t0 = time.perf_counter()
        _, weights = apply_fn(model, tok, [copy.deepcopy(spare)], hp, copy=False,
                              return_orig_weights=True, keep_original_weight=True)
        warmup_s = time.perf_counter() - t0
        import torch

        with torch.no_grad():
            for name, value in weights.items():
                nethook.get_parameter(model, name)[...] = value
        del weights
        base = _memory_point()
    mode, size = edit_mode(method, hp)
    calls = edit_calls(n, mode, size)
    times = []
    for start, end in calls:
        chunk = [copy.deepcopy(r) for r in reqs[start:end]]
        t0 = time.perf_counter()
        model, _ = apply_fn(model, tok, chunk, hp, copy=False, return_orig_weights=False,
                            keep_original_weight=False)
        times.append(time.perf_counter() - t0)
    after = _memory_point()
    total = sum(times)
    return {
        "status": "ok", "mode": mode, "call_size": size, "edits": n, "calls": len(calls),
        "seconds": total, "seconds_per_edit": total / n, "edits_per_second": n / total,
        "warmup_seconds": warmup_s,
        "peak_rss_bytes": _peak_rss_bytes(), "base_rss_bytes": base["rss"],
        "rss_above_base_bytes": after["rss"] - base["rss"],
        "tensor_bytes_above_base": after["tensors"] - base["tensors"],
        "rewrite_acc": None if job.get("timing_only") else _rewrite_accuracy(model, tok, reqs),
    }


def _slot_bytes(layer) -> int:
    seen, total = set(), 0
    for t in list(layer.slots.parameters()) + list(layer.slots.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _table_bytes(layer) -> int:
    table = layer.__dict__.get("_routing_table")
    if table is None or not table.n:
        return 0
    built = [table.__dict__[k] for k in ("down", "key_dirs") if k in table.__dict__]
    return sum(t.numel() * t.element_size() for t in built + [
        table.anchors_t, table.owner, table.enabled, table.dead, table.anchor_bias])


def _warm_up_runtime(model, tok, stream: Sequence[dict], prompts: Sequence[str],
                     warm_edits: Sequence[dict], hp, gen_tokens: int) -> None:
    """Make the memory baseline the loaded model with a warm runtime, not a cold one.

    Before the baseline: the tokenizer sees every text the run will tokenize (a fast
    tokenizer caches each new word, 2 MB over 1000 testbed edits, which is the tokenizer's
    memory, not the edited model's), and one edit call is made, served (the forwards and
    generations the run will time) and taken out again, so that the one-off allocations of a
    first call (kernel scratch space, caches torch, transformers and the libraries build
    lazily) are in the baseline too. The model is as loaded afterwards.
    """
    from .editing import apply_lemoe_to_model
    from .injection import remove_adaptor
    from .training import encode_edits

    encode_edits(tok, stream, 10 ** 6)
    for p in prompts:
        tok(p)
    model, _ = apply_lemoe_to_model(model, tok, [copy.deepcopy(r) for r in warm_edits], hp)
    _serving(model, tok, prompts, gen_tokens, 1)
    remove_adaptor(model)


def _installments(model, tok, stream: Sequence[dict], hp, call_size: int,
                  after_call: Optional[Callable[[Any, int, float], None]] = None):
    """Make ``stream``'s edits in calls of ``call_size`` (one expert each), one after the
    other; ``after_call(model, edits_done, seconds_of_the_call)`` runs after each (not
    timed). Returns the edited model."""
    from .editing import apply_lemoe_to_model

    for start in range(0, len(stream), call_size):
        chunk = [copy.deepcopy(r) for r in stream[start:start + call_size]]
        t0 = time.perf_counter()
        model, _ = apply_lemoe_to_model(model, tok, chunk, hp)
        if after_call is not None:
            after_call(model, start + len(chunk), time.perf_counter() - t0)
    return model


def _rehearse_stream(model, tok, stream: Sequence[dict], hp, call_size: int) -> None:
    """Make ``stream``'s edits as the measured installments will, then take the adaptor
    out: the model is as loaded, the runtime has met every shape of the run.

    MKL's memory manager keeps each GEMM buffer it frees, for the next product of that
    shape (about 9 KB per shape, measured on this testbed; ``MKL_DISABLE_FAST_MM=1`` makes
    it 0). The prompts of a stream have many lengths, so a first pass grows that pool by
    megabytes, and the pool's pages end up between the experts' allocations, where neither
    ``malloc_trim`` nor ``mkl_free_buffers`` gives them back. A second pass over the same
    shapes finds its buffers, so what it adds is what editing keeps.
    """
    from .injection import remove_adaptor

    remove_adaptor(_installments(model, tok, stream, hp, call_size))


def _lemoe_worker(job: dict) -> dict:
    """LEMoE twice over.

    1. **Protocol mode**, for each T in ``stream``, from a freshly loaded model: the T edits
       given as the evaluation protocol gives them (calls of ``batch_size`` from the hparams,
       planned into experts of ``edits_per_expert``). This is LEMoE's editing cost.
    2. **Installments**: one call of ``--edits-per-expert`` edits after the other (one expert
       each), up to ``max(stream)``: the marginal cost per edit along the stream, serving
       cost at each number of experts in ``experts``, and memory.

    A ``timing_only`` job (a later round) times the protocol mode and the installment
    stream (after a rehearsal of it, as the first round does) and nothing else.
    """
    import dataclasses

    from .evaluation import load_model_and_tokenizer
    from .injection import find_adaptor

    _worker_setup(job)
    hp = _load_job_hparams(job)
    requests = json.loads(Path(job["requests"]).read_text())
    T, epe, window = max(job["stream"]), job["edits_per_expert"], job["window"]
    inst_hp = dataclasses.replace(hp, edits_per_expert=epe, batch_size=max(hp.batch_size, epe))
    if job.get("timing_only"):
        model, tok = load_model_and_tokenizer(inst_hp)
        _rehearse_stream(model, tok, requests[:T], inst_hp, epe)
        calls: List[dict] = []
        _installments(model, tok, requests[:T], inst_hp, epe,
                      lambda _, done, seconds: calls.append({"edits": done, "seconds": seconds}))
        del model
        _settle()
        return {"status": "ok", "protocol": _lemoe_protocol(job, hp, requests),
                "installments": {"stream": calls, "seconds_per_edit_at": _marginal_per_edit_at(
                    calls, job["stream"], window)}}

    # -- 2. installments (first: its memory baseline is the loaded model, warmed up) ------
    model, tok = load_model_and_tokenizer(inst_hp)
    # Latency prompts: half edited by the first checkpoint, half never edited (locality
    # prompts, or requests beyond the stream).
    n_lat = max(2, job["latency_prompts"])
    edited_prompts = [r["prompt"] for r in requests[:min(epe, T)]]
    other = [v["prompt"] for r in requests[:T] for v in (r.get("locality") or {}).values()
             if isinstance(v, dict) and isinstance(v.get("prompt"), str)]
    other = other or [r["prompt"] for r in requests[T:]]
    prompts = [(edited_prompts if i % 2 == 0 or not other else other)[(i // 2) % max(
        1, len(edited_prompts if i % 2 == 0 or not other else other))] for i in range(n_lat)]
    _rewrite_accuracy(model, tok, requests[:2])  # warm-up of the forward path
    _warm_up_runtime(model, tok, requests[:T], prompts, requests[T:T + epe] or requests[:epe],
                     inst_hp, job["gen_tokens"])
    cold = _memory_point()
    _rehearse_stream(model, tok, requests[:T], inst_hp, epe)
    base = _memory_point()
    stream: List[dict] = []
    serving: List[dict] = []
    checkpoints = set(job["experts"])
    first: Dict[str, int] = {}

    def after_call(model, done: int, seconds: float) -> None:
        stream.append({"edits": done, "seconds": seconds})
        layer = find_adaptor(model)
        if not first:  # after the first call: the runtime's one-off allocations are made
            first.update(_memory_point(), expert_bytes=_slot_bytes(layer))
        if len(layer.slots) in checkpoints:
            checkpoints.discard(len(layer.slots))
            serving.append({"experts": len(layer.slots), "edits": done,
                            **_serving(model, tok, prompts, job["gen_tokens"],
                                       job["repeats"])})

    model = _installments(model, tok, requests[:T], inst_hp, epe, after_call)
    layer = find_adaptor(model)
    after = _memory_point()
    expert_bytes, table_bytes = _slot_bytes(layer), _table_bytes(layer)
    installments = {
        "call_size": epe, "edits": T, "calls": len(stream), "experts": len(layer.slots),
        "seconds": sum(s["seconds"] for s in stream),
        "seconds_per_edit_at": _marginal_per_edit_at(stream, job["stream"], window),
        "stream": stream, "serving": serving,
        "base_rss_bytes": base["rss"],
        "rss_above_base_bytes": after["rss"] - base["rss"],
        "tensor_bytes_above_base": after["tensors"] - base["tensors"],
        "expert_bytes": expert_bytes, "routing_table_bytes": table_bytes,
        # From the end of the first call to the end of the stream: growth against the bytes
        # of the experts added meanwhile (free of one-off runtime allocations).
        "rss_growth_after_first_bytes": after["rss"] - first["rss"],
        "tensor_growth_after_first_bytes": after["tensors"] - first["tensors"],
        "anon_above_base_bytes": _difference(after["anon"], base["anon"]),
        # The same against the cold baseline (one warm-up call, before the rehearsal), and
        # what the rehearsal left behind once its adaptor was out (runtime pools; tensors ~0).
        "rss_above_cold_base_bytes": after["rss"] - cold["rss"],
        "anon_above_cold_base_bytes": _difference(after["anon"], cold["anon"]),
        "tensor_bytes_above_cold_base": after["tensors"] - cold["tensors"],
        "rehearsal_retained_rss_bytes": base["rss"] - cold["rss"],
        "rehearsal_retained_anon_bytes": _difference(base["anon"], cold["anon"]),
        "rehearsal_retained_tensor_bytes": base["tensors"] - cold["tensors"],
        "anon_growth_after_first_bytes": _difference(after["anon"], first["anon"]),
        "expert_bytes_after_first": expert_bytes - first["expert_bytes"],
        "rewrite_acc": _rewrite_accuracy(model, tok, requests[:T]),
    }
    del model, layer
    _settle()

    protocol = _lemoe_protocol(job, hp, requests)
    return {
        "status": "ok", "edits_per_expert": hp.edits_per_expert,
        "order_planning": hp.order_planning, **_protocol_fields(protocol),
        "protocol": protocol, "installments": installments,
        "peak_rss_bytes": _peak_rss_bytes(), "base_rss_bytes": base["rss"],
        "rss_above_base_bytes": installments["rss_above_base_bytes"],
    }


def _marginal_per_edit_at(calls: Sequence[dict], ts: Sequence[int],
                          window: int) -> Dict[str, Optional[float]]:
    """:func:`_marginal_per_edit` at each ``t`` of ``ts``, keyed by ``str(t)``."""
    return {str(t): _marginal_per_edit(calls, t, window) for t in ts}


def _marginal_per_edit(calls: Sequence[dict], t: int, window: int) -> Optional[float]:
    """Seconds per edit of the installment calls that end within the ``window`` edits up to
    edit ``t`` (``calls``: ``{"edits": edits done after the call, "seconds": its time}``)."""
    lo, secs, n, before = t - window, 0.0, 0, 0
    for c in calls:
        if lo < c["edits"] <= t:
            secs += c["seconds"]
            n += c["edits"] - max(lo, before)
        before = c["edits"]
    return secs / n if n else None


def _lemoe_protocol(job: dict, hp, requests: Sequence[dict]) -> List[dict]:
    """LEMoE's editing cost in protocol mode, for each T of the job's stream.

    A shorter T is timed on each of the T-edit blocks of the longest stream, each from a
    fresh model: every T then edits the same facts. The first 100 testbed edits alone need
    40% fewer training steps per edit than the 1000 (their expert batches converge sooner),
    which a single first block would count as growth with the stream. The longest T runs
    halfway through the shorter T's blocks, so that a drift of the machine's speed over the
    minute the runs take reaches both alike.
    """
    from .editing import apply_lemoe_to_model
    from .evaluation import edit_calls, edit_mode, load_model_and_tokenizer
    from .injection import find_adaptor

    T = max(job["stream"])
    mode, size = edit_mode("LEMoE", hp)
    runs = [(t, offset) for t in job["stream"] if t != T
            for offset in range(0, max(T // t, 1) * t, t)]
    runs.insert(len(runs) // 2, (T, 0))
    calls = {t: edit_calls(t, mode, size) for t in job["stream"]}
    blocks: Dict[int, List[dict]] = {t: [] for t in job["stream"]}
    for t, offset in runs:
        model, tok = load_model_and_tokenizer(hp)
        block = requests[offset:offset + t]
        t0 = time.perf_counter()
        for start, end in calls[t]:
            model, _ = apply_lemoe_to_model(
                model, tok, [copy.deepcopy(r) for r in block[start:end]], hp)
        seconds = time.perf_counter() - t0
        adaptor = find_adaptor(model)
        blocks[t].append({"first_edit": offset, "seconds": seconds,
                          "experts": len(adaptor.slots),
                          "steps": sum(e.get("steps", 0) for e in adaptor.history),
                          "rewrite_acc": _rewrite_accuracy(model, tok, block)})
        del model
        _settle()
    return [_protocol_entry(t, blocks[t], mode, size, len(calls[t])) for t in job["stream"]]


def _protocol_entry(t: int, blocks: List[dict], mode: str, call_size: int, calls: int) -> dict:
    """One T's protocol figures from its blocks (time per edit: total over the blocks)."""
    secs = sum(b["seconds"] for b in blocks)
    steps = sum(b["steps"] for b in blocks)
    return {"T": t, "mode": mode, "call_size": call_size, "calls": calls, "blocks": blocks,
            "seconds": secs / len(blocks), "seconds_per_edit": secs / (t * len(blocks)),
            "experts": blocks[0]["experts"],
            # Time per edit = steps per edit x time per step: the first is the method's (how
            # soon the batches converge), the second the implementation's.
            "steps_per_edit": steps / (t * len(blocks)),
            "seconds_per_step": secs / steps if steps else None,
            "rewrite_acc": sum(b["rewrite_acc"] for b in blocks) / len(blocks)}


def _protocol_fields(protocol: List[dict]) -> dict:
    """LEMoE's editing-cost fields (those every method reports) from its protocol mode; the
    method's own figure is at the longest T."""
    last = protocol[-1]
    return {"mode": last["mode"], "call_size": last["call_size"], "edits": last["T"],
            "calls": last["calls"], "experts": last["experts"], "seconds": last["seconds"],
            "seconds_per_edit": last["seconds_per_edit"],
            "edits_per_second": 1.0 / last["seconds_per_edit"],
            "seconds_per_edit_at": {str(p["T"]): p["seconds_per_edit"] for p in protocol},
            "rewrite_acc": last["rewrite_acc"]}


def _fastest_round(first: dict, later: Sequence[dict]) -> dict:
    """``first`` (a method's whole first-round result) with each editing time replaced by
    its fastest over all rounds; every round's times are kept under ``rounds``.

    For LEMoE's protocol mode the unit is one T's round: all its blocks of one round
    together, the round with the least total kept (not each block's fastest round: the
    fastest of many short runs dodges a bursty machine's slow spells more often than the
    fastest of one long run does, which would count as growth with T). For the other
    methods it is the whole timed run. Rounds that failed are left out, their errors listed.
    """
    ok = [r for r in later if r.get("status") == "ok"]
    res = dict(first)
    failed = [r.get("error", "") for r in later if r.get("status") != "ok"]
    if failed:
        res["failed_rounds"] = failed
    if "protocol" in first:
        protocol = []
        for i, p in enumerate(first["protocol"]):
            runs = [p] + [r["protocol"][i] for r in ok]
            best = min(runs, key=lambda r: r["seconds"])
            blocks = [dict(b, rounds=[r["blocks"][j]["seconds"] for r in runs])
                      for j, b in enumerate(best["blocks"])]
            protocol.append(dict(best, blocks=blocks, rounds=[r["seconds"] for r in runs]))
        # Each round's time at the longest T (the blocks keep theirs).
        res.update(_protocol_fields(protocol), protocol=protocol,
                   rounds=[r["protocol"][-1]["seconds"] for r in [first] + ok])
        # Installments: each window's fastest round (every window is the same ten calls).
        inst = dict(first["installments"])
        per_round = {t: [r["installments"]["seconds_per_edit_at"].get(t) for r in [first] + ok]
                     for t in inst["seconds_per_edit_at"]}
        inst["seconds_per_edit_at"] = {
            t: min((v for v in vs if v is not None), default=None) for t, vs in per_round.items()}
        inst["rounds"] = per_round
        res["installments"] = inst
        return res
    seconds = [first["seconds"]] + [r["seconds"] for r in ok]
    res.update(seconds=min(seconds), seconds_per_edit=min(seconds) / first["edits"],
               edits_per_second=first["edits"] / min(seconds), rounds=seconds)
    return res


def _difference(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else a - b


def _training_worker(job: dict) -> dict:
    import dataclasses

    import torch

    from .evaluation import load_model_and_tokenizer
    from .injection import inject_adaptor
    from .training import encode_edits, train_slot

    _worker_setup(job)
    hp = _load_job_hparams(job)
    requests = json.loads(Path(job["requests"]).read_text())[:job["train_edits"]]
    epe = hp.edits_per_expert
    base, tok = load_model_and_tokenizer(hp)
    batches = [encode_edits(tok, requests[i:i + epe], hp.max_length)
               for i in range(0, len(requests), epe)]
    runs: Dict[bool, dict] = {}
    for cached in (False, True, False, True):
        variant = dataclasses.replace(hp, cached_activations=cached)
        model = copy.deepcopy(base)
        layer = inject_adaptor(model, variant)
        trace: List[float] = []
        t0 = time.perf_counter()
        for i, edits in enumerate(batches):
            slot = layer.new_slot(seed=hp.seed + i)
            train_slot(model, layer, i, edits, tok, variant, progress=False, trace=trace)
            slot.freeze()
        dt = time.perf_counter() - t0
        if cached not in runs:
            runs[cached] = {"seconds": dt, "trace": trace,
                            "weights": [p.detach().clone() for p in layer.slots.parameters()]}
        else:
            runs[cached]["seconds"] = min(runs[cached]["seconds"], dt)
        del model, layer
    full, cached = runs[False], runs[True]
    a, b = torch.tensor(cached["trace"]), torch.tensor(full["trace"])
    same_len = a.shape == b.shape
    rel = float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) if same_len and len(a) \
        else float("inf")
    wdiff = max(float((x - y).abs().max()) for x, y in zip(cached["weights"], full["weights"]))
    wscale = max(float(y.abs().max()) for y in full["weights"])
    return {
        "status": "ok", "edits": len(requests), "experts": len(batches),
        "steps": len(b), "cached_seconds": cached["seconds"], "full_seconds": full["seconds"],
        "speedup": full["seconds"] / cached["seconds"],
        "max_rel_loss_diff": rel, "max_abs_weight_diff": wdiff, "max_abs_weight": wscale,
        "same_steps": same_len,
    }


WORKERS = {"baseline": _baseline_worker, "lemoe": _lemoe_worker, "training": _training_worker}


def _run_worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    try:
        result = WORKERS[job["kind"]](job)
    except Exception as exc:  # noqa: BLE001 - reported in the table, traceback in the log
        import traceback

        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    Path(job["result"]).write_text(json.dumps(result, indent=1))
    return 0 if result.get("status") == "ok" else 1


# ----------------------------------------------------------------------- set-up


def _testbed_path() -> Optional[Path]:
    try:
        from . import testbed
    except ImportError:
        return None
    shipped = getattr(testbed, "shipped_model_path", None)
    complete = getattr(testbed, "_complete", None)
    if shipped is None:
        return None
    path = shipped()
    if complete is not None and not complete(path):
        return None
    return path if path.is_dir() else None


def _synthetic_requests(n: int, seed: int) -> List[dict]:
    """``n`` edits "<name> lives in the city of" -> a city, with unrelated locality prompts."""
    rng = random.Random(seed)
    first = ["Ada", "Ben", "Cleo", "Dov", "Ena", "Fil", "Gia", "Hal", "Ivo", "Jun", "Kai",
             "Lia", "Mo", "Nia", "Oto", "Pia", "Rex", "Sia", "Teo", "Uma"]
    last = ["Arlo", "Brask", "Corr", "Dunn", "Elm", "Fane", "Grove", "Hask", "Irwin",
            "Joss", "Kemp", "Lorn", "Marsh", "Nell", "Orme", "Pike", "Quill", "Roan",
            "Sedge", "Tarn"]
    cities = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lima",
              "Cairo", "Tokyo", "Quito", "Dakar"]
    out = []
    for i in range(n):
        name = f"{first[i % 20]} {last[(i // 20) % 20]}" + (f" {i // 400}" if i >= 400 else "")
        out.append({
            "prompt": f"{name} lives in the city of", "target_new": rng.choice(cities),
            "ground_truth": "Nowhere", "subject": name,
            "rephrase_prompt": f"The home town of {name} is",
            "locality": {"neighborhood": {"prompt": f"The weather report {i} says it is",
                                          "ground_truth": "sunny"}},
            "portability": {},
        })
    return out


def _corpus_lines(requests: Sequence[dict]) -> List[str]:
    lines = []
    for r in requests:
        lines.append(f"{r['prompt']} {r['target_new']}.")
        for k, v in (r.get("locality") or {}).items():
            if isinstance(v, dict) and isinstance(v.get("prompt"), str):
                lines.append(f"{v['prompt']} {v.get('ground_truth', '')}.")
    return lines


def _lm_head_name(model) -> str:
    """Name under which ``named_parameters`` lists the LM head's weight (tied: the embedding)."""
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        if p is head:
            return name[: -len(".weight")]
    raise ValueError("the LM head's weight is not among the model's parameters")


def _generated_hparams(method: str, model_path: str, stats_dir: str, corpus: str) -> dict:
    """Hyper-parameters of ``method`` for any supported model, from the family table."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model_families import family_of

    config = AutoConfig.from_pretrained(model_path)
    with _meta_device():
        model = AutoModelForCausalLM.from_config(config)
    fam = family_of(model)
    n = getattr(config, fam.num_layers_key)
    mid = n // 2
    block = f"{fam.layers_path}.{{}}"
    templates = dict(
        rewrite_module_tmp=f"{block}.{fam.mlp_name}.{fam.out_proj}",
        layer_module_tmp=block, mlp_module_tmp=f"{block}.{fam.mlp_name}",
        attn_module_tmp=f"{block}.{fam.attn_name}", ln_f_module=fam.final_norm,
        lm_head_module=_lm_head_name(model))
    common = dict(alg_name=method, model_name=model_path, device=0, max_length=40,
                  model_parallel=False)
    rome_like = dict(fact_token="subject_last", v_num_grad_steps=20, v_lr=0.5,
                     v_loss_layer=n - 1, v_weight_decay=1e-3, clamp_norm_factor=4,
                     kl_factor=0.0625, mom2_adjustment=True, mom2_dataset=corpus,
                     mom2_n_samples=10000, mom2_dtype="float32", stats_dir=stats_dir)
    if method == "LEMoE":
        from .hparams import HPARAMS_DIR
        import yaml

        cfg = yaml.safe_load((HPARAMS_DIR / "tiny-llama.yaml").read_text())
        cfg.update(model_name=model_path, layer=mid, edits_per_expert=25,
                   train_batch_size=25, batch_size=1000)
        return cfg
    if method == "ROME":
        return dict(common, layers=[max(0, mid - 1)], context_template_length_params=[[5, 10]],
                    **templates, **rome_like)
    if method == "MEMIT":
        return dict(common, layers=sorted({max(0, mid - 1), mid}), layer_selection="all",
                    mom2_update_weight=15000, batch_size=1, **templates, **rome_like)
    if method == "FT":
        t = dict(templates, rewrite_module_tmp=templates["rewrite_module_tmp"] + ".weight")
        return dict(common, layers=[mid], num_steps=25, batch_size=1, lr=5e-3,
                    weight_decay=0, kl_factor=0, norm_constraint=False, **t)
    if method == "GRACE":
        return dict(common, inner_params=[f"{fam.layers_path}[{n - 1}].{fam.mlp_name}."
                                          f"{fam.out_proj}.weight"],
                    edit_lr=1.0, n_iter=50, eps=1.0, dist_fn="euc", val_init="cold",
                    val_train="sgd", reg="early_stop", replacement="replace_last",
                    eps_expand="coverage", num_pert=8, dropout=0.0, batch_size=1)
    raise ValueError(f"no generated hparams for {method!r}")


@contextlib.contextmanager
def _meta_device():
    import torch

    with torch.device("meta"):
        yield


def _grace_available() -> bool:
    from .evaluation import _ensure_method

    try:
        _ensure_method("GRACE")
    except (ValueError, ImportError):
        return False
    return True


# ----------------------------------------------------------------------- the run


#: (key, description, how to read it)
TARGETS = (
    ("throughput_vs_grace", "LEMoE editing throughput >= 10x GRACE's at T=max", 10.0),
    ("throughput_vs_rome", "LEMoE editing throughput >= 3x ROME's at T=max", 3.0),
    ("cached_speedup", "cached-activation training >= 2x faster than full forward", 2.0),
    ("latency_5", "forward latency within 10% of base with 5 experts", 1.10),
    ("latency_100", "forward latency within 25% of base with 100 experts", 1.25),
    ("stream_growth", "time per edit at T=max within 20% of that at T=min "
                      "(protocol mode, fresh model each)", 1.20),
    ("marginal_growth", "marginal time per edit at T=max within 20% of that at T=min "
                        "(installments)", 1.20),
    ("memory", "RSS above the loaded model (warm runtime) = experts' bytes within 10%",
     0.10),
    ("anon_memory", "anonymous RSS (no shared-library pages) above the loaded model (warm "
                    "runtime) = experts' bytes within 10%", 0.10),
    ("memory_growth", "RSS growth after the first call = bytes of the experts added, "
                      "within 10%", 0.10),
    ("anon_growth", "anonymous RSS growth (no shared-library pages) after the first call = "
                    "bytes of the experts added, within 10%", 0.10),
    ("tensor_growth", "live tensor bytes above the loaded model = experts' bytes "
                      "(+ routing table) within 10%", 0.10),
)


def _growth(per_edit: dict) -> Optional[float]:
    ts = sorted(int(t) for t, v in (per_edit or {}).items() if v)
    return per_edit[str(ts[-1])] / per_edit[str(ts[0])] if len(ts) >= 2 else None


def _evaluate_targets(res: dict) -> List[dict]:
    out = []
    methods, le = res["methods"], res["methods"].get("LEMoE", {})
    ok = le.get("status") == "ok"
    inst = le.get("installments", {}) if ok else {}
    serving = {s["experts"]: s for s in inst.get("serving", [])}
    training = res.get("training", {})
    for key, text, bound in TARGETS:
        value, met, band = None, None, False
        if key.startswith("throughput_vs_"):
            other = methods.get(key.split("_")[-1].upper(), {})
            if other.get("status") == "ok" and ok:
                value = other["seconds_per_edit"] / le["seconds_per_edit"]
                met = value >= bound
        elif key == "cached_speedup" and training.get("status") == "ok":
            value = training["speedup"]
            met = value >= bound and training["max_rel_loss_diff"] <= 1e-4
        elif key.startswith("latency_"):
            s = serving.get(int(key.split("_")[1]))
            if s:
                value = s["forward_ratio"]
                met = value <= bound
        elif key == "stream_growth" and ok:
            value = _growth(le["seconds_per_edit_at"])
        elif key == "marginal_growth" and ok:
            value = _growth(inst["seconds_per_edit_at"])
        elif key == "memory" and ok and inst["expert_bytes"]:
            value, band = inst["rss_above_base_bytes"] / inst["expert_bytes"], True
        elif key == "anon_memory" and ok and inst["expert_bytes"] and \
                inst.get("anon_above_base_bytes") is not None:
            value, band = inst["anon_above_base_bytes"] / inst["expert_bytes"], True
        elif key == "memory_growth" and ok and inst["expert_bytes_after_first"]:
            value = inst["rss_growth_after_first_bytes"] / inst["expert_bytes_after_first"]
            band = True
        elif key == "anon_growth" and ok and inst["expert_bytes_after_first"] and \
                inst.get("anon_growth_after_first_bytes") is not None:
            value = inst["anon_growth_after_first_bytes"] / inst["expert_bytes_after_first"]
            band = True
        elif key == "tensor_growth" and ok and inst["expert_bytes"]:
            value, band = inst["tensor_bytes_above_base"] / inst["expert_bytes"], True
        if key.endswith("growth") and not band and value is not None:
            met = value <= bound
        if band:
            met = abs(value - 1.0) <= bound
        out.append({"target": key, "description": text, "value": value, "met": met})
    return out


def _subprocess_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _spawn(name: str, job: dict, out: Path, timeout: int) -> dict:
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = dict(job, result=str(jobs / f"{name}.result.json"))
    path = jobs / f"{name}.json"
    path.write_text(json.dumps(job, indent=1))
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, "-m", "lemoe_easyedit.bench", "--worker", str(path)],
                           stdout=f, stderr=subprocess.STDOUT, cwd=str(out),
                           env=_subprocess_env(job["threads"]), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout} s (see {log})"}
    result_file = Path(job["result"])
    if not result_file.exists():
        return {"status": "error", "error": f"worker died without a result (see {log})"}
    result = json.loads(result_file.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def run_bench(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark; returns the results (also written to ``--out``)."""
    import torch
    import transformers

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stream = sorted(set(args.stream))
    T = stream[-1]
    window = max(1, min(args.window, stream[0]))
    grace_edits = args.grace_edits or T
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    need = max(T, args.baseline_edits, grace_edits, args.train_edits) + 1

    testbed = _testbed_path() if args.model is None else None
    if args.model is not None:
        model_path, source = str(Path(args.model).resolve()) if Path(args.model).exists() \
            else args.model, "given"
    elif testbed is not None:
        model_path, source = str(testbed), "testbed"
    else:
        from .testing import build_tiny_model

        reqs = _synthetic_requests(need, args.seed)
        model_path = str(build_tiny_model("llama", out / "model", texts=_corpus_lines(reqs),
                                          hidden=128, intermediate=512, layers=4))
        source = "built (testbed absent)"

    if args.data_path:
        requests = json.loads(Path(args.data_path).read_text())
        data = f"file {args.data_path}"
    elif source == "testbed":
        from .testbed import testbed_edit_set, to_requests

        requests = to_requests(testbed_edit_set(need, seed=args.seed))
        data = "testbed edit set"
    else:
        requests = _synthetic_requests(need, args.seed)
        data = "synthetic"
    if len(requests) < need:
        raise ValueError(f"the benchmark needs {need} requests, the data has {len(requests)}")
    requests = requests[:need]
    req_file = out / "requests.json"
    req_file.write_text(json.dumps(requests))

    stats_dir = out / "stats"
    if source == "testbed":
        from .runner import write_testbed_corpus

        corpus = str(write_testbed_corpus(stats_dir / "corpus"))
    else:
        corpus_file = stats_dir / "corpus.txt"
        corpus_file.parent.mkdir(parents=True, exist_ok=True)
        corpus_file.write_text("\n".join(_corpus_lines(requests)) + "\n")
        corpus = str(corpus_file)

    name = args.hparams_name or (TESTBED_HPARAMS if source == "testbed" else None)
    methods = ["LEMoE"] + [m for m in args.methods if m != "LEMoE" and m in METHODS]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    hp_files, hp_origin = {}, {}
    for m in methods:
        shipped = REPO_ROOT / "hparams" / m / f"{name}.yaml" if name else None
        if shipped is not None and shipped.is_file():
            hp_files[m], hp_origin[m] = str(shipped), str(shipped.relative_to(REPO_ROOT))
        else:
            import yaml

            cfg = _generated_hparams(m, model_path, str(stats_dir), corpus)
            path = out / "hparams" / f"{m}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            hp_files[m], hp_origin[m] = str(path), "generated"

    base_job = dict(model=model_path, requests=str(req_file), stats_dir=str(stats_dir),
                    corpus=corpus, threads=args.threads, seed=args.seed,
                    edits_per_expert=args.edits_per_expert)
    results: Dict[str, Any] = {}
    jobs = {"LEMoE": dict(
        base_job, kind="lemoe", method="LEMoE", hparams=hp_files["LEMoE"], stream=stream,
        window=window, experts=args.experts, latency_prompts=args.latency_prompts,
        gen_tokens=args.gen_tokens, repeats=args.repeats)}
    for m in methods[1:]:
        if m == "GRACE" and not _grace_available():
            results[m] = {"status": "n/a", "error": "GRACE is not registered"}
            continue
        jobs[m] = dict(base_job, kind="baseline", method=m, hparams=hp_files[m],
                       edits=grace_edits if m == "GRACE" else args.baseline_edits)
    for m, job in jobs.items():
        results[m] = _spawn(m, job, out, args.timeout)
    for m in METHODS:
        if m not in results:
            results[m] = {"status": "n/a", "error": "not requested"}
    training = _spawn("training", dict(base_job, kind="training", method="LEMoE",
                                       hparams=hp_files["LEMoE"], train_edits=args.train_edits),
                      out, args.timeout)
    # Later rounds: every method's editing once more, round after round (not one method's
    # repeats back to back), so that a slow spell of the machine reaches all methods alike.
    later: Dict[str, List[dict]] = {m: [] for m in jobs}
    for n in range(2, args.rounds + 1):
        for m, job in jobs.items():
            if results[m].get("status") == "ok":
                later[m].append(_spawn(f"{m}.round{n}", dict(job, timing_only=True), out,
                                       args.timeout))
    for m, rounds in later.items():
        if rounds:
            results[m] = _fastest_round(results[m], rounds)

    lemoe = results["LEMoE"]
    lemoe_spe = lemoe.get("seconds_per_edit")
    for m, r in results.items():
        if r.get("status") == "ok" and lemoe_spe:
            r["time_ratio_to_lemoe"] = r["seconds_per_edit"] / lemoe_spe
    res = {
        "settings": {
            "model": model_path, "model_source": source, "data": data,
            "hparams": hp_origin, "threads": args.threads, "seed": args.seed,
            "stream": stream, "window": window, "edits_per_expert": args.edits_per_expert,
            "experts": args.experts, "baseline_edits": args.baseline_edits,
            "grace_edits": grace_edits,
            "train_edits": args.train_edits, "latency_prompts": args.latency_prompts,
            "gen_tokens": args.gen_tokens, "repeats": args.repeats, "rounds": args.rounds,
            "command": getattr(args, "_command", None),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__},
        },
        "methods": results,
        "training": training,
    }
    res["targets"] = _evaluate_targets(res)
    res["settings"]["wall_seconds"] = time.perf_counter() - t_start
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    (out / "bench.md").write_text(markdown(res))
    return res


# ----------------------------------------------------------------------- reporting


def _f(v, fmt="{:.3g}") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v != v:
        return "n/a"
    return fmt.format(v)


def _mb(v) -> str:
    return "n/a" if v is None else f"{v / 2 ** 20:.1f}"


def markdown(res: dict) -> str:
    """The benchmark's results as markdown tables."""
    s = res["settings"]
    lines = [f"# LEMoE performance benchmark", "",
             f"Model: `{s['model']}` ({s['model_source']}); edits: {s['data']}; "
             f"torch threads: {s['threads']}; {s['machine']['cpu_count']} CPUs, "
             f"torch {s['machine']['torch']}, transformers {s['machine']['transformers']}.",
             f"Command: `{' '.join(s['command']) if s.get('command') else 'n/a'}`", "",
             "## Editing cost", "",
             f"Each method's time is its fastest of {s.get('rounds', 1)} round(s); a later "
             "round times every method's editing again (same edits, fresh model) after all "
             "methods of the round before. Memory and accuracy are from the first round.", "",
             "| method | mode | edits timed | s / edit | edits / s | time / LEMoE's | "
             "seconds per round | peak RSS (MB) | RSS above model (MB) | rewrite acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = res["methods"].get(m, {})
        if r.get("status") != "ok":
            lines.append(f"| {m} | {r.get('status', 'n/a')}: {r.get('error', '')} "
                         "| | | | | | | | |")
            continue
        mode = f"{r['mode']} ({r['call_size']}/call)"
        rounds = ", ".join(_f(v) for v in r.get("rounds", [r["seconds"]]))
        lines.append(f"| {m} | {mode} | {r['edits']} | {_f(r['seconds_per_edit'])} | "
                     f"{_f(r['edits_per_second'])} | {_f(r.get('time_ratio_to_lemoe'))} | "
                     f"{rounds} | {_mb(r['peak_rss_bytes'])} | "
                     f"{_mb(r['rss_above_base_bytes'])} | {_f(r['rewrite_acc'], '{:.3f}')} |")
    le = res["methods"].get("LEMoE", {})
    if le.get("status") == "ok":
        inst = le["installments"]
        lines += ["", "## LEMoE cost along the stream", "",
                  f"Protocol mode: the T edits from a freshly loaded model, in calls of "
                  f"{le['call_size']}, "
                  f"{'planned' if le['order_planning'] else 'cut in order'} "
                  f"into experts of {le['edits_per_expert']} edits "
                  f"(a shorter T: mean over the T-edit blocks of the longest stream, each from "
                  f"a fresh model; the fastest round of all its blocks together). "
                  f"Installments: calls of {inst['call_size']} edits (one expert each) one "
                  f"after the other; marginal time per edit over the {s['window']} edits "
                  "before T (each window's fastest round).", "",
                  "| T | protocol: experts | protocol: s / edit | protocol: training steps "
                  "/ edit | protocol: ms / step | installments: experts | "
                  "installments: marginal s / edit |", "|---|---|---|---|---|---|---|"]
        proto = {str(p["T"]): p for p in le["protocol"]}
        for t in sorted(proto, key=int):
            p = proto[t]
            per_step = p.get("seconds_per_step")
            lines.append(f"| {t} | {p['experts']} | {_f(p['seconds_per_edit'])} "
                         f"| {_f(p.get('steps_per_edit'))} "
                         f"| {_f(None if per_step is None else 1000 * per_step)} "
                         f"| {-(-int(t) // inst['call_size'])} | "
                         f"{_f(inst['seconds_per_edit_at'].get(t))} |")
        ends = [proto[min(proto, key=int)], proto[max(proto, key=int)]]
        if len(proto) > 1 and all(p.get("seconds_per_step") for p in ends):
            ratio = [ends[1][k] / ends[0][k]
                     for k in ("seconds_per_edit", "steps_per_edit", "seconds_per_step")]
            lines += ["", f"Protocol growth T={ends[1]['T']} / T={ends[0]['T']}: time per "
                      f"edit {_f(ratio[0])} = training steps per edit {_f(ratio[1])} x time "
                      f"per step {_f(ratio[2])} (the steps are the method's: how soon the "
                      "batches converge; the time per step is the implementation's)."]
        lines += ["", "## Serving cost (edited / unedited, interleaved in one process, best of "
                  f"{s['repeats']})", "",
                  f"Forward: {s['latency_prompts']} prompts one at a time (half edited, half "
                  f"not), and as one padded batch; generation: greedy, {s['gen_tokens']} new "
                  "tokens, batch 1.", "",
                  "| experts | forward ms (base) | forward ms | ratio | batch fwd ratio | "
                  "gen tok/s (base) | gen tok/s | gen throughput ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in inst["serving"]:
            lines.append(f"| {v['experts']} | {_f(v['forward_ms_base'])} | "
                         f"{_f(v['forward_ms'])} | {_f(v['forward_ratio'])} | "
                         f"{_f(v['batch_forward_ratio'])} | {_f(v['gen_tokens_per_s_base'])} | "
                         f"{_f(v['gen_tokens_per_s'])} | {_f(v['gen_ratio'])} |")
        lines += ["", "## Memory after the installments", "",
                  f"{inst['experts']} experts; the stacked routing table adds "
                  f"{_mb(inst['routing_table_bytes'])} MB (included in the live tensors). "
                  "Baseline: the loaded model after the runtime has run this stream once "
                  "(edits made and taken out: the runtime's buffer pools are warm); the cold "
                  "baseline is the loaded model after one warm-up call.", "",
                  "| interval | experts' bytes (MB) | RSS growth (MB) | ratio | "
                  "anonymous RSS growth (MB) | ratio | live tensor growth (MB) | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, eb, rss, anon, ten in (
                ("loaded model (warm runtime) -> end of stream", inst["expert_bytes"],
                 inst["rss_above_base_bytes"], inst.get("anon_above_base_bytes"),
                 inst["tensor_bytes_above_base"]),
                ("loaded model (cold baseline) -> end of stream", inst["expert_bytes"],
                 inst.get("rss_above_cold_base_bytes"), inst.get("anon_above_cold_base_bytes"),
                 inst.get("tensor_bytes_above_cold_base")),
                ("end of first call -> end of stream", inst["expert_bytes_after_first"],
                 inst["rss_growth_after_first_bytes"], inst.get("anon_growth_after_first_bytes"),
                 inst["tensor_growth_after_first_bytes"])):
            ratio = (lambda v: _f(v / eb if eb and v is not None else None))
            lines.append(f"| {label} | {_mb(eb)} | {_mb(rss)} | {ratio(rss)} | {_mb(anon)} | "
                         f"{ratio(anon)} | {_mb(ten)} | {ratio(ten)} |")
        if inst.get("rehearsal_retained_rss_bytes") is not None:
            lines += ["", f"The rehearsal of the stream, its adaptor taken out, left "
                      f"{_mb(inst['rehearsal_retained_rss_bytes'])} MB of RSS "
                      f"({_mb(inst.get('rehearsal_retained_anon_bytes'))} MB anonymous) and "
                      f"{_mb(inst['rehearsal_retained_tensor_bytes'])} MB of live tensors "
                      "behind."]
    tr = res.get("training", {})
    lines += ["", "## Cached-activation vs full-forward training", ""]
    if tr.get("status") == "ok":
        lines += ["| edits | experts | steps | full (s) | cached (s) | speed-up | "
                  "max rel. loss diff | max weight diff (max weight) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {tr['edits']} | {tr['experts']} | {tr['steps']} | "
                  f"{_f(tr['full_seconds'])} | {_f(tr['cached_seconds'])} | "
                  f"{_f(tr['speedup'])} | {_f(tr['max_rel_loss_diff'])} | "
                  f"{_f(tr['max_abs_weight_diff'])} ({_f(tr['max_abs_weight'])}) |"]
    else:
        lines.append(f"{tr.get('status', 'n/a')}: {tr.get('error', '')}")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['description']} | {_f(t['value'])} | {met} |")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------- entry points


def bench_command(args: argparse.Namespace) -> int:
    """``lemoe-easyedit bench``: run, print the markdown, return the exit status."""
    if getattr(args, "worker", None):
        return _run_worker(args.worker)
    if not getattr(args, "_command", None):
        args._command = [Path(sys.argv[0]).name] + sys.argv[1:]
    res = run_bench(args)
    print(markdown(res))
    print(f"results: {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    failed = [m for m, r in res["methods"].items() if r.get("status") == "error"]
    if res["training"].get("status") == "error":
        failed.append("training")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._command = ["python", "benchmarks/bench.py"] + argv
    return bench_command(args)


if __name__ == "__main__":
    sys.exit(main())
