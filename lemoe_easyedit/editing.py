"""EasyEdit glue: ``apply_lemoe_to_model``, the function registered as ``LEMoE``.

Two ways in, as EasyEdit calls it:

* **online** (one request per call, ``BaseEditor.edit``): the newest expert stays open and is
  retrained on its accumulated edits until it holds ``edits_per_expert``, then it is frozen
  and the next request opens a new one;
* **batch** (several requests, ``BaseEditor.batch_edit``): the requests are planned into
  batches of ``edits_per_expert`` (K-means order planning unless ``order_planning`` is off)
  and every batch gets its own expert, frozen once trained.

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
    requests = validate_requests(requests)
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
            _edit_batches(model, layer, tok, requests, hparams)
    except BaseException:
        _undo_call(model, layer, call_state)
        raise
    if callable_restore:
        return model, lambda: _restore(layer, before)
    if transient:
        return model, {f"{layer.module_path}.slots.{i}.enabled": torch.zeros(())
                       for i in range(n_slots, len(layer.slots))}
    return model, {}


def validate_requests(requests: Sequence[Dict]) -> List[Dict]:
    """Check EasyEdit request dicts; ValueError names the request index and the field."""
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
        _check_capacity(layer, 1, hp)
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


def _edit_batches(model, layer: LEMoELayer, tok, requests: List[Dict], hp) -> None:
    requests = _last_wins(requests)
    encoded = encode_edits(tok, requests, hp.max_length)  # validates before any change
    device = _device(layer)
    # Planning reads the prompts' queries; without it only the count matters.
    queries = prompt_queries(model, layer, tok, requests, hp.max_length, device) \
        if hp.order_planning else torch.zeros(len(requests), 1)
    subjects: Dict[str, int] = {}
    negatives = negative_pool(model, layer, tok, requests, subjects, hp, device)
    planner = EditOrderPlanner(hp.edits_per_expert, hp.seed, enabled=hp.order_planning)
    planner.fit(queries.cpu().numpy())
    _check_capacity(layer, len(planner.batches_), hp)
    if layer.open_slot is not None:
        layer.open_slot.freeze()
    for batch in tqdm(planner.batches_, desc="LEMoE batches", leave=False,
                      disable=True if len(planner.batches_) < 2 else None):  # None: TTY only
        slot = layer.new_slot(seed=hp.seed + len(layer.slots))
        slot.edits = [_record(layer, requests[i]) for i in batch]
        index = len(layer.slots) - 1
        about = [requests[i].get("subject") for i in batch]
        stats = train_slot(model, layer, index, [encoded[i] for i in batch], tok, hp,
                           negatives=negatives, edit_subjects=subject_ids(about, subjects))
        slot.freeze()
        _log(layer, {"mode": "batch", "slot": index, "batch": batch, **stats})
    layer.plans = getattr(layer, "plans", []) + [
        {"order": planner.order_, "batches": planner.batches_}]


def _device(layer: LEMoELayer) -> torch.device:
    return layer.slots[0].routing.key.device if len(layer.slots) else \
        layer.queries.embed.weight.device


def _last_wins(requests: List[Dict]) -> List[Dict]:
    """Of several requests with the same prompt, keep only the last (documented policy)."""
    last = {r["prompt"]: i for i, r in enumerate(requests)}
    return [r for i, r in enumerate(requests) if last[r["prompt"]] == i]


def _check_capacity(layer: LEMoELayer, new: int, hp) -> None:
    if hp.max_experts is not None and len(layer.slots) + new > hp.max_experts:
        raise ValueError(f"max_experts={hp.max_experts} would be exceeded: the model has "
                         f"{len(layer.slots)} experts and this edit needs {new} more")


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
