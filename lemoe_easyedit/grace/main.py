"""``apply_grace_to_model``: GRACE through EasyEdit's edit-function contract."""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import easyedit
from ..model_families import cached_length
from .adapter import EARLY_STOP_LOSS, GraceAdapter, find_grace
from .hparams import GraceHyperParams

Restore = Union[Dict[str, torch.Tensor], Callable[[], None]]


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"GRACE inner_params names {path!r}, which this model does not have"
                         ) from exc


def inject_grace(model: nn.Module, hparams: GraceHyperParams) -> GraceAdapter:
    """The model's GRACE adaptor, wrapped around ``hparams.module_path`` if not there yet."""
    existing = find_grace(model)
    path = hparams.module_path
    if existing is not None:
        if existing.module_path != path:
            raise ValueError(f"this model already has a GRACE adaptor at "
                             f"{existing.module_path}; hparams ask for {path}")
        existing.replacement = hparams.replacement
        existing.eps_expand = hparams.eps_expand
        existing.eps_init = float(hparams.eps)
        return existing
    target = _get_module(model, path)
    if isinstance(target, GraceAdapter):  # pragma: no cover - found above
        return target
    adapter = GraceAdapter(target, path, hparams.eps, hparams.replacement, hparams.eps_expand)
    parent_path, _, name = path.rpartition(".")
    setattr(_get_module(model, parent_path) if parent_path else model, name, adapter)

    def mark_continuation(module, args, kwargs):
        adapter._continuing = cached_length(kwargs) > 0

    adapter.hook_handle = model.register_forward_pre_hook(mark_continuation, with_kwargs=True)
    return adapter


def remove_grace(model: nn.Module) -> bool:
    """Put the wrapped module back; True if there was a GRACE adaptor."""
    adapter = find_grace(model)
    if adapter is None:
        return False
    handle = getattr(adapter, "hook_handle", None)
    if handle is not None:
        handle.remove()
    parent_path, _, name = adapter.module_path.rpartition(".")
    setattr(_get_module(model, parent_path) if parent_path else model, name, adapter.layer)
    return True


def _encode(tok, request: Dict, max_length: int) -> Tuple[List[int], int]:
    prompt, target = request["prompt"], request["target_new"]
    full = list(tok(prompt + " " + target)["input_ids"])
    plen = len(tok(prompt)["input_ids"])
    if len(full) <= plen:
        raise ValueError(f"target_new {target!r} adds no tokens to the prompt {prompt!r}")
    cut = max(0, len(full) - max(int(max_length), 2))
    cut = min(cut, plen - 1)  # keep at least the last prompt token
    return full[cut:], plen - cut


def _device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device


def edit_one(model: nn.Module, tok, adapter: GraceAdapter, request: Dict,
             hparams: GraceHyperParams, edit_id: int) -> Dict[str, Any]:
    """Add one edit to the codebook and train its value; returns a log entry."""
    ids, plen = _encode(tok, request, hparams.max_length)
    device = _device(model)
    input_ids = torch.tensor([ids], device=device)
    key_pos = plen - 1
    captured = {}

    def grab(module, args, output):
        captured["x"] = args[0][0, key_pos].detach()
        captured["y"] = output[0, key_pos].detach()

    handle = adapter.layer.register_forward_hook(grab)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:, :plen])
    finally:
        handle.remove()
    label = ids[plen:]
    if hparams.val_init == "warm":
        init = captured["y"].float()
    else:
        init = torch.rand(captured["y"].shape[-1], device=captured["y"].device)
    info = adapter.update_codebook(captured["x"], label, init, edit_id)
    j = int(info["key"])

    labels = torch.full_like(input_ids, -100)
    labels[0, plen:] = input_ids[0, plen:]
    vec = nn.Parameter(adapter.values[j].detach().clone().float())
    opt = torch.optim.Adam([vec], lr=hparams.edit_lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    adapter._training = (j, vec, key_pos)
    losses = []
    try:
        for _ in range(hparams.n_iter):
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            loss = F.cross_entropy(logits, labels[0, 1:].to(logits.device), ignore_index=-100)
            losses.append(loss.item())
            if hparams.reg == "early_stop" and losses[-1] < EARLY_STOP_LOSS:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        adapter._training = None
        for p in frozen:
            p.requires_grad_(True)
        if was_training:
            model.train()
    with torch.no_grad():
        adapter.values[j] = vec.detach().to(adapter.values.dtype)
        # Training forced the key token onto key j; serving does not. An edit whose prompt
        # does not reach its own key unforced would be reported done and never served.
        model(input_ids=input_ids[:, :plen])
    hits = adapter.last_hits
    dist, nearest = adapter.nearest(captured["x"].reshape(1, -1))
    if hits is None or not bool(hits[0, key_pos]) or int(nearest[0]) != j:
        raise RuntimeError(
            f"GRACE: edit {edit_id} ({request['prompt']!r} -> {request['target_new']!r}) "
            f"does not reach its own key {j} without forcing (nearest key "
            f"{int(nearest[0])} at distance {float(dist[0]):.4g}, radius "
            f"{float(adapter.epsilons[j]):.4g}); the call was undone")
    info.update(steps=len(losses), loss=losses[-1] if losses else None, keys=adapter.num_keys)
    return info


def apply_grace_to_model(model: nn.Module, tok, requests: Sequence[Dict],
                         hparams: GraceHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any) -> Tuple[nn.Module, Restore]:
    """Edit ``model`` with GRACE, one request after the other; EasyEdit's contract.

    Returns ``(model, weights_copy)``: the same model object (edited in place unless
    ``copy``) and, for restoring, ``{}`` (edits kept), a callable (upstream EasyEdit) or,
    with the release and ``keep_original_weight=True``, the codebook tensors as they were
    with the new keys switched off (pruned on the next call).
    """
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise ValueError("requests is empty: nothing to edit")
    for i, r in enumerate(requests):
        for key in ("prompt", "target_new"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"request {i}: field {key!r} must be a non-empty string")
    if copy:
        model = deepcopy(model)
    adapter = inject_grace(model, hparams)
    adapter.prune_inactive()
    before = adapter.snapshot()
    log = list(getattr(adapter, "history", []))
    counter = getattr(adapter, "edit_counter", 0)
    try:
        for r in requests:
            edit_id = getattr(adapter, "edit_counter", 0)
            adapter.edit_counter = edit_id + 1
            log.append(edit_one(model, tok, adapter, r, hparams, edit_id))
    except BaseException:
        adapter.load_snapshot(before)
        adapter.edit_counter = counter
        raise
    adapter.history = log
    if easyedit.uses_callable_restore():
        return model, lambda: adapter.load_snapshot(before)
    if keep_original_weight:
        k_before = before["keys"].shape[0]
        keys = adapter.keys.detach().clone()
        values = adapter.values.detach().clone()
        eps = adapter.epsilons.detach().clone()
        active = torch.zeros_like(adapter.active)
        if k_before:
            keys[:k_before] = before["keys"]
            values[:k_before] = before["values"]
            eps[:k_before] = before["epsilons"]
            active[:k_before] = before["active"]
        p = adapter.module_path
        return model, {f"{p}.keys": keys, f"{p}.values": values, f"{p}.epsilons": eps,
                       f"{p}.active": active}
    return model, {}
