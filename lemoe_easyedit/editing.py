"""EasyEdit glue: ``apply_lemoe_to_model``, the function registered as ``LEMoE``.

Two ways in, as EasyEdit calls it:

* **online** (one request per call, ``BaseEditor.edit``): the newest expert stays open and is
  retrained on its accumulated edits until it holds ``edits_per_expert``, then it is frozen
  and the next request opens a new one;
* **batch** (several requests, ``BaseEditor.batch_edit``): the open expert, if any, is
  filled first; the rest are planned into batches of ``edits_per_expert`` (K-means order
  planning unless ``order_planning`` is off), each with its own expert, frozen once full;
  a last, partly filled expert stays open for the next call. So ``max_experts`` bounds
  the whole stream, however many calls deliver it.

A prompt edited again wins over its earlier edit: within one call (the last request with
that prompt is kept), in the open expert (its record is replaced), and across experts (the
anchor router breaks ties towards the later expert; the learned router trains the later
expert to win on the earlier expert's identical anchors). Rolling the later expert back
(``lemoe_easyedit.rollback``) brings the earlier edit back.

Restoring follows the installed EasyEdit: the registry release writes back the returned
``weights_copy`` tensors when ``keep_original_weight=True`` (we return each new expert's
``enabled`` flag set to 0, and prune disabled experts on the next call); upstream EasyEdit
calls a returned function, which rolls the call back exactly.
"""

from __future__ import annotations

import math
from copy import copy as shallow_copy, deepcopy
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import easyedit
from .injection import find_adaptor, inject_adaptor, remove_adaptor
from .layer import LEMoELayer
from .ordering import EditOrderPlanner
from .locality import subject_ids
from .routing import SUBJECT_ROUTER
from .training import encode_edits, negative_pool, prompt_queries, train_slot

Restore = Union[Dict[str, torch.Tensor], Callable[[], None]]


def apply_lemoe_to_model(model: nn.Module, tok, requests: Sequence[Dict], hparams,
                         copy: bool = False, return_orig_weights: bool = False,
                         keep_original_weight: bool = False,
                         **kwargs: Any) -> Tuple[nn.Module, Restore]:
    """Edit ``model`` with LEMoE; EasyEdit's edit-function contract.

    Returns ``(edited_model, weights_copy)``; the model is edited in place unless ``copy``.
    Bad requests or hparams raise ValueError before anything changes. Any failure later on
    (a request the tokenizer cannot fit in ``max_length``, a diverging training run, an
    interrupt) puts the model back exactly as it was before the call, then re-raises.
    """
    requests = validate_requests(requests, subject_required=hparams.router == SUBJECT_ROUTER)
    if copy:
        model = deepcopy(model)
    hparams.check_model(model)
    previous = find_adaptor(model)
    call_state = _call_state(previous)
    layer = inject_adaptor(model, hparams)
    try:
        prune_disabled(layer)
        callable_restore = easyedit.uses_callable_restore()
        transient = keep_original_weight and not callable_restore
        before = _snapshot(layer)
        n_slots = len(layer.slots)
        if len(requests) == 1 and not transient:
            _edit_online(model, layer, tok, requests[0], hparams)
        else:
            _edit_batches(model, layer, tok, requests, hparams, fill_open=not transient)
    except BaseException:
        _undo_call(model, layer, call_state)
        raise
    if callable_restore:
        return model, lambda: _restore(layer, before)
    if transient:
        return model, {f"{layer.module_path}.slots.{i}.enabled": torch.zeros(())
                       for i in range(n_slots, len(layer.slots))}
    return model, {}


def validate_requests(requests: Sequence[Dict], subject_required: bool = False) -> List[Dict]:
    """Check EasyEdit request dicts; ValueError names the request index and the field.

    ``subject_required``: every request must name its ``subject`` (the subject router).
    """
    if isinstance(requests, dict):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        raise TypeError(f"requests must be a list of dicts, got {type(requests).__name__}")
    if not requests:
        raise ValueError("requests is empty: nothing to edit")
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise TypeError(f"request {i}: expected a dict, got {type(r).__name__}")
        for key in ("prompt", "target_new"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"request {i}: field {key!r} must be a string, got "
                                 f"{r.get(key)!r}")
            if not r[key].strip():
                raise ValueError(f"request {i}: field {key!r} is empty")
        subject = r.get("subject")
        if subject is None and subject_required:
            raise ValueError(f"request {i}: field 'subject' is needed by router 'subject' "
                             f"(it routes by the subject's tokens)")
        if subject is not None:
            if not isinstance(subject, str) or not subject.strip():
                raise ValueError(f"request {i}: field 'subject' must be a non-empty string")
            if subject not in r["prompt"]:
                raise ValueError(f"request {i}: subject {subject!r} does not occur in prompt "
                                 f"{r['prompt']!r}")
        out.append(r)
    return out


def prune_disabled(layer: LEMoELayer) -> None:
    """Drop experts that EasyEdit switched off by restoring their ``enabled`` flag."""
    for i in reversed(range(len(layer.slots))):
        if not layer.slots[i].is_enabled:
            layer.remove_slot(i)


def _record(layer: LEMoELayer, request: Dict) -> Dict:
    layer.edit_counter = getattr(layer, "edit_counter", 0) + 1
    keep = ("prompt", "target_new", "subject", "rephrase_prompt", "ground_truth")
    rec = {k: request[k] for k in keep if isinstance(request.get(k), str)}
    rec["edit_id"] = layer.edit_counter - 1
    return rec


def _edit_online(model, layer: LEMoELayer, tok, request: Dict, hp) -> None:
    slot = layer.open_slot
    if slot is not None and len(slot.edits) >= hp.edits_per_expert:
        slot.freeze()
        slot = None
    if slot is None:
        _check_capacity(layer, 1, hp, 1, 0)
        slot = layer.new_slot(seed=hp.seed + len(layer.slots))
    # A later edit of the same prompt replaces the earlier one inside the open expert.
    slot.edits = [e for e in slot.edits if e["prompt"] != request["prompt"]]
    slot.edits.append(_record(layer, request))
    index = len(layer.slots) - 1
    subjects: Dict[str, int] = {}
    negatives = negative_pool(model, layer, tok, slot.edits, subjects, hp, _device(layer))
    about = [e.get("subject") for e in slot.edits]
    stats = train_slot(model, layer, index, encode_edits(tok, slot.edits, hp.max_length), tok,
                       hp, progress=False, negatives=negatives,
                       edit_subjects=subject_ids(about, subjects))
    if len(slot.edits) >= hp.edits_per_expert:
        slot.freeze()
    _log(layer, {"mode": "online", "slot": index, **stats})


def _edit_batches(model, layer: LEMoELayer, tok, requests: List[Dict], hp,
                  fill_open: bool = True) -> None:
    """Batch mode: the open expert (if any) is filled first, the rest is planned into new
    experts of ``edits_per_expert``; the last one stays open when it is not full.

    So ``max_experts`` bounds the whole stream however it is cut into calls: a stream of
    ``T`` edits ends with ``ceil(T / edits_per_expert)`` experts. ``fill_open=False`` (a
    call EasyEdit's release undoes by switching new experts off) leaves the open expert
    alone and freezes it: switching off a filled expert would also undo its earlier edits.
    """
    requests = _last_wins(requests)
    encoded = encode_edits(tok, requests, hp.max_length)  # validates before any change
    device = _device(layer)
    open_slot = layer.open_slot if fill_open else None
    room = 0 if open_slot is None else max(0, hp.edits_per_expert - len(open_slot.edits))
    fill = _fill_choice(model, layer, tok, requests, hp, device, room)
    rest = [i for i in range(len(requests)) if i not in set(fill)]
    _check_capacity(layer, math.ceil(len(rest) / hp.edits_per_expert), hp, len(requests),
                    room)
    # Planning reads the prompts' queries; without it only the count matters.
    queries = prompt_queries(model, layer, tok, [requests[i] for i in rest], hp.max_length,
                             device) if hp.order_planning and len(rest) > 1 \
        else torch.zeros(max(1, len(rest)), 1)
    subjects: Dict[str, int] = {}
    negatives = negative_pool(model, layer, tok, requests, subjects, hp, device)
    if fill:
        # A request whose prompt the open expert already holds replaces that record.
        prompts = {requests[i]["prompt"] for i in fill}
        open_slot.edits = [e for e in open_slot.edits if e["prompt"] not in prompts] + \
            [_record(layer, requests[i]) for i in fill]
        index = len(layer.slots) - 1
        about = [e.get("subject") for e in open_slot.edits]
        stats = train_slot(model, layer, index,
                           encode_edits(tok, open_slot.edits, hp.max_length), tok, hp,
                           negatives=negatives, edit_subjects=subject_ids(about, subjects))
        if len(open_slot.edits) >= hp.edits_per_expert:
            open_slot.freeze()
        _log(layer, {"mode": "batch", "slot": index, "batch": fill, "filled_open": True,
                     **stats})
    elif layer.open_slot is not None:
        layer.open_slot.freeze()
    batches: List[List[int]] = []
    if rest:
        if layer.open_slot is not None:
            layer.open_slot.freeze()  # full, or left alone (fill_open=False)
        planner = EditOrderPlanner(hp.edits_per_expert, hp.seed, enabled=hp.order_planning)
        planner.fit(queries.cpu().numpy())
        batches = [[rest[j] for j in b] for b in planner.batches_]
    for batch in tqdm(batches, desc="LEMoE batches", leave=False,
                      disable=True if len(batches) < 2 else None):  # None: TTY only
        slot = layer.new_slot(seed=hp.seed + len(layer.slots))
        slot.edits = [_record(layer, requests[i]) for i in batch]
        index = len(layer.slots) - 1
        about = [requests[i].get("subject") for i in batch]
        stats = train_slot(model, layer, index, [encoded[i] for i in batch], tok, hp,
                           negatives=negatives, edit_subjects=subject_ids(about, subjects))
        # A full expert is frozen; the last, partly filled one stays open for the next call.
        if len(batch) >= hp.edits_per_expert or not fill_open:
            slot.freeze()
        _log(layer, {"mode": "batch", "slot": index, "batch": batch, **stats})
    order = fill + [i for b in batches for i in b]
    layer.plans = getattr(layer, "plans", []) + [
        {"order": order, "batches": ([fill] if fill else []) + batches,
         "filled_open": bool(fill)}]


def _fill_choice(model, layer: LEMoELayer, tok, requests: List[Dict], hp, device,
                 room: int) -> List[int]:
    """Indices of the requests that go into the open expert's ``room`` free places.

    With order planning, the requests whose prompt queries are nearest (cosine) to the
    open expert's anchors' mean direction, so that the expert keeps semantically close
    edits; without it, the first ``room`` requests in the given order.
    """
    if room <= 0:
        return []
    if room >= len(requests) or not hp.order_planning:
        return list(range(min(room, len(requests))))
    slot = layer.open_slot
    q = prompt_queries(model, layer, tok, requests, hp.max_length, device)
    centre = slot.anchors.float().mean(0).to(q.device)
    sims = q.float() @ (centre / centre.norm().clamp_min(1e-12))
    return sorted(torch.topk(sims, room).indices.tolist())


def _device(layer: LEMoELayer) -> torch.device:
    """Where the edit batches go: the adapted FFN's execution device (its weights, and the
    embeddings', may rest on ``meta`` under an offloading device map)."""
    return layer.base_layer_device()


def _last_wins(requests: List[Dict]) -> List[Dict]:
    """Of several requests with the same prompt, keep only the last (documented policy)."""
    last = {r["prompt"]: i for i, r in enumerate(requests)}
    return [r for i, r in enumerate(requests) if last[r["prompt"]] == i]


def _check_capacity(layer: LEMoELayer, new: int, hp, edits: int = 1, room: int = 0) -> None:
    """ValueError naming the numbers when ``new`` more experts would exceed ``max_experts``
    (checked before anything changes, so nothing already edited is lost)."""
    if hp.max_experts is not None and len(layer.slots) + new > hp.max_experts:
        raise ValueError(
            f"max_experts={hp.max_experts} would be exceeded: the model holds "
            f"{len(layer.slots)} experts ({room} free places in the open one) and these "
            f"{edits} edits need {new} more of {hp.edits_per_expert} edits each "
            f"({len(layer.slots) + new} in all); nothing was changed. Raise max_experts "
            f"or edits_per_expert, or roll back experts first")


def _log(layer: LEMoELayer, entry: Dict) -> None:
    layer.history = getattr(layer, "history", []) + [entry]


def _snapshot(layer: LEMoELayer) -> Dict:
    open_slot = layer.open_slot
    return {
        "n_slots": len(layer.slots),
        "open": None if open_slot is None else (
            {k: v.detach().clone() for k, v in open_slot.state_dict().items()},
            [dict(e) for e in open_slot.edits]),
    }


def _restore(layer: LEMoELayer, snap: Dict) -> None:
    """Undo one call of ``apply_lemoe_to_model`` (upstream EasyEdit's restore callable)."""
    while len(layer.slots) > snap["n_slots"]:
        layer.remove_slot(len(layer.slots) - 1)
    if snap["open"] is not None:
        state, edits = snap["open"]
        slot = layer.slots[snap["n_slots"] - 1]
        slot.load_slot_state(state)
        slot.edits = edits
        slot.unfreeze()


_CALL_ATTRS = ("edit_counter", "history", "plans")


def _call_state(layer) -> Dict:
    """What one call may change, to put back on failure (see :func:`_undo_call`).

    Frozen slots are never modified by a call, so references suffice; the open slot (the
    only one trained in place) is copied. A call replaces the slots' edit lists and the
    layer's history and plans with new lists and never changes a record in place, so
    shallow copies keep them: a deep copy grew with the whole stream (7 ms per call after
    1000 testbed edits, a fifth of the call).
    """
    if layer is None:
        return {"had_adaptor": False}
    open_slot = layer.open_slot
    return {
        "had_adaptor": True,
        "hparams": layer.hparams,
        "slots": list(layer.slots),
        "frozen": [s.frozen for s in layer.slots],
        "edits": [list(s.edits) for s in layer.slots],
        "open": None if open_slot is None else
        {k: v.detach().clone() for k, v in open_slot.state_dict().items()},
        "attrs": {k: shallow_copy(getattr(layer, k)) for k in _CALL_ATTRS if hasattr(layer, k)},
    }


def _undo_call(model: nn.Module, layer: LEMoELayer, state: Dict) -> None:
    """Put the adaptor back as :func:`_call_state` saw it (or take it out if it was new)."""
    layer.forced_routes = None
    if not state["had_adaptor"]:
        remove_adaptor(model)
        return
    layer.hparams = state["hparams"]
    layer.slots = nn.ModuleList(state["slots"])
    for slot, frozen, edits in zip(layer.slots, state["frozen"], state["edits"]):
        slot.edits = edits
        if frozen:
            slot.freeze()
        else:
            slot.unfreeze()
    if state["open"] is not None:
        slot = layer.slots[-1]
        slot.load_slot_state(state["open"])
        for p in slot.parameters():
            p.grad = None
    for k in _CALL_ATTRS:
        if k in state["attrs"]:
            setattr(layer, k, state["attrs"][k])
        elif hasattr(layer, k):
            delattr(layer, k)
