"""The bench's subprocess workers: each edits with one method (or trains LEMoE's experts)
and writes its figures to a JSON result file."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .measure import (_memory_point, _peak_rss_bytes, _rewrite_accuracy, _serving,
                      _settle)

# ----------------------------------------------------------------------- workers


def _load_job_hparams(job: dict):
    from lemoe_easyedit.evaluation import load_hparams

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
    from lemoe_easyedit.evaluation.methods import _ensure_method

    _ensure_method(job["method"])


def _baseline_worker(job: dict) -> dict:
    # The evaluation package loads easyeditor through the bridge: before easyeditor itself.
    from lemoe_easyedit.evaluation import edit_calls, edit_mode, load_model_and_tokenizer

    from easyeditor.util import nethook
    from easyeditor.util.alg_dict import ALG_DICT

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
    # The learned router's stacked projections exist once it has routed.
    built = [t for t in (table._down, table._key_dirs) if t is not None]
    kept = [getattr(table, name, None) for name in ("anchors_t", "owner", "enabled", "dead",
                                                    "anchor_bias", "radius")]
    return sum(t.numel() * t.element_size() for t in built + kept
               if hasattr(t, "element_size"))


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
    from lemoe_easyedit.editing import apply_lemoe_to_model
    from lemoe_easyedit.injection import remove_adaptor
    from lemoe_easyedit.training import encode_edits

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
    from lemoe_easyedit.editing import apply_lemoe_to_model

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
    from lemoe_easyedit.injection import remove_adaptor

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

    from lemoe_easyedit.evaluation import load_model_and_tokenizer
    from lemoe_easyedit.injection import find_adaptor

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
    from lemoe_easyedit.editing import apply_lemoe_to_model
    from lemoe_easyedit.evaluation import edit_calls, edit_mode, load_model_and_tokenizer
    from lemoe_easyedit.injection import find_adaptor

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

    from lemoe_easyedit.evaluation import load_model_and_tokenizer
    from lemoe_easyedit.injection import inject_adaptor
    from lemoe_easyedit.training import encode_edits, train_slot

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


