"""Training one expert slot on its batch of edits.

Phase 1 (``router="learned"`` only) fits the slot's routing projection and key so that the
batch's own anchor queries choose the new expert while every earlier batch's anchors keep
choosing theirs. Phase 2 fits the expert with the next-token loss on the target tokens
(teacher forcing), routing every position exactly as inference will; with
``prompt_variants``, each edit's prompt variants (tokens dropped around the subject) train
beside it, their answers routed as the edit's. Nothing else trains.

Phase 2 splits the edits into minibatches once (shuffled with ``hparams.seed``); each epoch
only visits them in a new order. With ``cached_activations`` (the default) every minibatch
goes through the model once, without autograd, and each step runs only the expert and the
blocks above the adaptor (:mod:`.activation_cache`); otherwise each step is a full model
forward. Both give the same losses and the same expert, up to float rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .activation_cache import UpperStack
from .layer import LEMoELayer
from .locality import NO_RADIUS, NegativePool, fit_radii, subject_ids, subject_swaps
from .routing import LAYER_INPUT_POOL, SUBJECT_ROUTER, Routes, note_slot_change
from .subjects import subject_positions


@dataclass
class EncodedEdit:
    """Token ids of ``prompt + ' ' + target`` and where the target starts.

    The split follows EasyEdit's metric: the target tokens are those after
    ``len(tok(prompt))`` in ``tok(prompt + ' ' + target)``.
    """

    input_ids: List[int]
    prompt_len: int


def encode_edits(tok, requests: Sequence[Dict], max_length: int) -> List[EncodedEdit]:
    """Tokenise edits as EasyEdit scores them.

    Truncation policy: when prompt and target together exceed ``max_length`` tokens, the
    beginning of the prompt is dropped (the target and the prompt's end are what the edit is
    about). A target that alone does not fit raises ValueError.
    """
    if not requests:
        return []
    # One batched call per field (a fast tokenizer's batch encodes in parallel, and even a
    # slow one saves the per-call overhead): the same ids as one call per string.
    fulls = tok([r["prompt"] + " " + r["target_new"] for r in requests])["input_ids"]
    prompts = tok([r["prompt"] for r in requests])["input_ids"]
    out = []
    for i, (r, full, prompt_ids) in enumerate(zip(requests, fulls, prompts)):
        target = r["target_new"]
        plen = len(prompt_ids)
        if len(full) <= plen:
            raise ValueError(f"request {i}: target_new {target!r} adds no tokens to the prompt")
        cut = max(0, len(full) - max_length)
        if plen - cut < 1:
            raise ValueError(f"request {i}: target_new {target!r} needs {len(full) - plen} "
                             f"tokens, more than max_length={max_length} allows")
        out.append(EncodedEdit(full[cut:], plen - cut))
    return out


@dataclass
class EditBatch:
    input_ids: torch.Tensor       # [B, L], right padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor          # [B, L], -100 outside the targets
    anchor_mask: torch.Tensor     # [B, L], positions that predict a target token
    #: [B]: the row of the edit each row is a prompt variant of (its own for an edit);
    #: None: every row is an edit.
    origin: Optional[torch.Tensor] = None


def collate(edits: Sequence[EncodedEdit], pad_id: int, device) -> EditBatch:
    """Right-pad a list of encoded edits into tensors on ``device``."""
    L = max(len(e.input_ids) for e in edits)
    B = len(edits)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    anchors = torch.zeros(B, L, dtype=torch.bool)
    for b, e in enumerate(edits):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, e.prompt_len:n] = ids[b, e.prompt_len:n]
        anchors[b, e.prompt_len - 1:n - 1] = True
    return EditBatch(ids.to(device), mask.to(device), labels.to(device), anchors.to(device))


class _LayerInputSeen(Exception):
    """Stops a forward once the adapted layer's input is known (nothing above is needed)."""


def edit_queries(model: nn.Module, layer: LEMoELayer, batch: EditBatch) -> torch.Tensor:
    """Routing queries ``[B, L, H]`` of a batch, as a forward of the model computes them.

    Also leaves the batch's padding mask in ``layer.queries.valid``. Embedding-layer pools
    need only the embeddings; ``ffn_input`` runs the model up to the adapted FFN.
    """
    queries = layer.queries
    if queries.track_ids:
        queries.note_ids(batch.input_ids, batch.attention_mask, past=0)
    if queries.pool != LAYER_INPUT_POOL:
        queries.build(queries.embed_ids(batch.input_ids), batch.attention_mask, past=0)
        return queries.query
    seen = {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _LayerInputSeen

    handle = layer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  use_cache=False)
    except _LayerInputSeen:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise RuntimeError("the model's forward never reached the LEMoE layer")
    return queries.current(seen["x"])[0]


def prompt_queries(model: nn.Module, layer: LEMoELayer, tok, requests: Sequence[Dict],
                   max_length: int, device, chunk: int = 256) -> torch.Tensor:
    """One query per edit: the one at the prompt's last token (used for order planning).

    Computed ``chunk`` edits at a time: a whole call at once (1000 edits of a 7B model)
    would hold every block's activations for all of them."""
    edits = encode_edits(tok, requests, max_length)
    out = []
    for start in range(0, len(edits), chunk):
        part = edits[start:start + chunk]
        q = edit_queries(model, layer, collate(part, _pad_id(tok), device))
        last = torch.tensor([e.prompt_len - 1 for e in part], device=q.device)
        out.append(q[torch.arange(len(part), device=q.device), last])
    return torch.cat(out)


def anchor_queries(model: nn.Module, layer: LEMoELayer, edits: Sequence[EncodedEdit], tok,
                   device, chunk: int = 256):
    """``(queries [N, H], edit index [N])`` at every anchor position of ``edits``: the
    positions that predict a target token, in the order :func:`train_slot` stores anchors.
    Computed ``chunk`` edits at a time."""
    queries, owners = [], []
    for start in range(0, len(edits), chunk):
        batch = collate(edits[start:start + chunk], _pad_id(tok), device)
        queries.append(edit_queries(model, layer, batch)[batch.anchor_mask].detach())
        owners.append(batch.anchor_mask.nonzero()[:, 0] + start)
    if not queries:
        return torch.zeros(0, layer.hidden, device=device), torch.zeros(0, dtype=torch.long)
    return torch.cat(queries), torch.cat(owners).cpu()


def negative_pool(model: nn.Module, layer: LEMoELayer, tok, requests: Sequence[Dict],
                  subjects: Dict[str, int], hp, device) -> NegativePool:
    """The negatives of one edit call (:mod:`.locality`), each labelled with the id (in
    ``subjects``, extended as needed) of the subject it is about:

    * the anchors of ``requests`` themselves and their subject swaps (subjects drawn from the
      requests' and the frozen experts' edits): one forward up to the adaptor.
      ``hp.negatives_per_edit`` swaps per request, more while the pool would hold fewer
      than ``hp.min_negatives`` prompts, so that a short stream's radii are fitted against
      as many negatives as a long one's;
    * the swaps of earlier calls, kept on the layer (up to ``hp.min_negatives`` prompts, so
      memory stays bounded): a stream edited in many small calls (online, installments)
      computes each request's swaps once and reaches the minimum early;
    * the anchors the frozen experts already hold (no forward), so that an edit of a later
      call is fitted against every subject that came before it.
    """
    if hp.negatives_per_edit <= 0 or not requests:
        return NegativePool.empty(layer.hidden, device)
    #: request key -> (swap queries, subject of each row, number of swap prompts)
    cache: Dict[tuple, tuple] = layer.__dict__.setdefault("_negative_cache", {})
    frozen = [s for s in layer.slots if s.frozen and s.is_enabled and len(s.anchors)]
    known = [r["subject"] for r in requests if isinstance(r.get("subject"), str)]
    known += [e["subject"] for s in frozen for e in s.edits
              if isinstance(e.get("subject"), str)]
    cached = sum(n for _, _, n in cache.values())
    held = len(requests) + sum(len(s.edits) for s in frozen) + cached
    per_edit = max(hp.negatives_per_edit,
                   math.ceil(max(0, hp.min_negatives - held) / len(requests)))
    todo = [r for r in requests if _request_key(r) not in cache]
    swaps = subject_swaps(todo, known, per_edit, hp.seed + len(cache))
    sources = list(requests) + swaps
    queries, owner = anchor_queries(model, layer, encode_edits(tok, sources, hp.max_length),
                                    tok, device)
    # Rows by the request they belong to: -1 for the requests' own rows, else the index in
    # ``todo`` of the request the row's swap was made from.
    made_from = [-1] * len(requests) + [w["source"] for w in swaps]
    groups: Dict[int, List[int]] = {}
    for row, src in enumerate(owner.tolist()):
        groups.setdefault(made_from[src], []).append(row)
    subject_of = [sources[i].get("subject") for i in owner.tolist()]
    swaps_made = Counter(w["source"] for w in swaps)

    def part(j: int):
        index = groups.get(j, [])
        return (queries[torch.tensor(index, dtype=torch.long, device=queries.device)],
                [subject_of[i] for i in index])

    parts = [part(-1)]
    for j, r in enumerate(todo):
        entry = (*part(j), swaps_made[j])
        if cached < hp.min_negatives:  # kept for later calls while the cache has room
            cache[_request_key(r)] = entry
            cached += entry[2]
        else:
            parts.append(entry[:2])
    parts += [entry[:2] for entry in cache.values()]
    queries = [q.to(device) for q, _ in parts]
    ids = [torch.tensor(subject_ids([a for _, about in parts for a in about], subjects),
                        dtype=torch.long)]
    for slot in frozen:
        owners = _anchor_owners(slot, tok, hp.max_length)
        if owners is None:
            continue  # edits and anchors out of step (not expected): leave the slot out
        slot_ids = torch.tensor(subject_ids([e.get("subject") for e in slot.edits], subjects),
                                dtype=torch.long)
        queries.append(slot.anchors.detach().to(device))
        ids.append(slot_ids[owners])
    return NegativePool(torch.cat(queries), torch.cat(ids).to(device))


def _anchor_owners(slot, tok, max_length: int) -> Optional[torch.Tensor]:
    """The edit index of each of ``slot``'s anchor rows: recorded by :func:`train_slot`, or
    (a slot loaded from disk) re-derived once from its edits' tokens."""
    owners = slot.__dict__.get("_anchor_owners")
    if owners is None or len(owners) != len(slot.anchors):
        owners = anchor_owners(tok, slot.edits, max_length)
        if owners is None or len(owners) != len(slot.anchors):
            return None
        slot.__dict__["_anchor_owners"] = owners
    return owners


def _request_key(r: Dict) -> tuple:
    return (r["prompt"], r["target_new"], r.get("subject"))


def anchor_owners(tok, edits: Sequence[Dict], max_length: int) -> Optional[torch.Tensor]:
    """The index in ``edits`` of each anchor row a slot trained on them holds (anchors are
    stored edit by edit, one per target token), or None when they cannot be encoded."""
    try:
        encoded = encode_edits(tok, edits, max_length)
    except (ValueError, KeyError):
        return None
    counts = torch.tensor([len(e.input_ids) - e.prompt_len for e in encoded])
    return torch.repeat_interleave(torch.arange(len(encoded)), counts)


def train_slot(model: nn.Module, layer: LEMoELayer, slot_index: int,
               edits: Sequence[EncodedEdit], tok, hp, progress: bool = True,
               trace: Optional[List[float]] = None,
               negatives: Optional[NegativePool] = None,
               edit_subjects: Optional[Sequence[int]] = None) -> Dict:
    """Fit slot ``slot_index`` to ``edits``; returns training statistics.

    ``negatives`` (with ``edit_subjects``, the subject id of each edit, ``-1`` unknown):
    the anchors' acceptance radii are fitted against them (:func:`~.locality.fit_radii`)
    before the expert trains, so that training routes as serving will. Without them the
    slot has no radii and only the global guard applies.

    On a non-finite loss the slot is put back as it was before this call and FloatingPointError
    is raised, so a diverging run never leaves a half-trained expert behind. ``trace``, if
    given, receives the loss of every expert training step.
    """
    # Every random choice of training (the minibatches and their order) comes from a
    # generator seeded with ``hp.seed``: the same expert for the same seed, and the caller's
    # global random state (CPU and every GPU) is neither read nor reseeded.
    try:
        return _train_slot(model, layer, slot_index, edits, tok, hp, progress, trace,
                           negatives, edit_subjects)
    finally:
        note_slot_change()  # the slot's routing and expert tensors were trained in place


def _train_slot(model, layer, slot_index, edits, tok, hp, progress, trace, negatives,
                edit_subjects) -> Dict:
    slot = layer.slots[slot_index]
    device = slot.routing.key.device
    snapshot = {k: v.detach().clone() for k, v in slot.state_dict().items()}
    full = collate(edits, _pad_id(tok), device)
    anchors = edit_queries(model, layer, full)[full.anchor_mask]
    owner = full.anchor_mask.nonzero()[:, 0].cpu()
    _check_queries(anchors, owner, slot.edits)
    slot.anchors = anchors.detach().clone()
    if hp.router == SUBJECT_ROUTER:
        slot.store_subjects(tok, owner)  # slot.edits are the records of ``edits``, in order
    slot.__dict__["_anchor_owners"] = owner  # read by negative_pool once the slot is frozen
    if negatives is not None and len(negatives):
        subjects = torch.tensor(list(edit_subjects) if edit_subjects is not None
                                else [-1] * len(edits), dtype=torch.long)
        slot.radius = fit_radii(slot.anchors, subjects[owner], negatives, hp.radius_margin)
    else:
        slot.radius = torch.full((len(slot.anchors),), NO_RADIUS, device=device)
    slot.unfreeze()
    # (Module.train/eval visit every module, the experts' included: a model already in eval
    # mode is left as it is, so this costs nothing per call however many experts there are.)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        stats = {"edits": len(edits)}
        if hp.router == "learned":
            stats.update(_fit_router(layer, slot_index, hp))
        stats.update(_fit_expert(model, layer, slot_index, edits, tok, hp, progress, trace))
    except FloatingPointError:
        slot.load_slot_state(snapshot)
        raise
    finally:
        if was_training:
            model.train()
    return stats


def _fit_router(layer: LEMoELayer, t: int, hp) -> Dict:
    slot = layer.slots[t]
    if hp.key_init == "centroid":
        slot.routing.init_key_at_centroid(slot.anchors)
        note_slot_change()  # written in place: a table built before must not be reused
    live = [i for i, s in enumerate(layer.slots) if s.is_enabled and s.anchors.numel()]
    # A prompt edited again in a later expert: the later edit wins, so an anchor of an earlier
    # expert equal to one of a later expert's is stale and not trained to route to it.
    later = [layer.slots[i].anchors for i in live if i > t]
    kept = [_fresh_anchors(layer.slots[i].anchors, slot.anchors) if i < t
            else _fresh_anchors(slot.anchors, torch.cat(later)) if i == t and later
            else layer.slots[i].anchors for i in live]
    queries = torch.cat(kept)
    labels = torch.cat([torch.full((len(a),), i, dtype=torch.long)
                        for i, a in zip(live, kept)]).to(queries.device)
    params = list(slot.routing.parameters())
    opt = torch.optim.AdamW(params, lr=hp.route_lr, weight_decay=0.0)

    # The loss is the cross-entropy of every live anchor's scores against its expert, and the
    # fit stops once every anchor's best score is its own expert's. Only slot t's routing
    # trains, so every other column of the score matrix is fixed: it is reduced once to what
    # the loss and the accuracy need (log-sum-exp, maxima before and after column t, the
    # fixed argmax), and each step scores the anchors with slot t only. The cost of a step
    # therefore does not grow with the number of experts.
    with torch.no_grad():
        table = layer.routing_table()
        fixed = table.scores(queries)
        others = table.enabled.clone()
        others[t] = False
        fixed = fixed.masked_fill(~others.to(fixed.device), float("-inf"))
        rows = torch.arange(len(queries), device=fixed.device)
        own = labels == t
        lse_fixed = torch.logsumexp(fixed, 1)
        label_score = fixed[rows, labels].masked_fill(own, 0.0)
        max_before = fixed[:, :t].amax(1) if t else torch.full_like(lse_fixed, float("-inf"))
        max_after = fixed[:, t + 1:].amax(1) if t + 1 < table.n \
            else torch.full_like(lse_fixed, float("-inf"))
        fixed_right = fixed.argmax(1) == labels
        del fixed

    def accuracy(new: torch.Tensor) -> float:
        # argmax takes the first of equal maxima: column t wins over equal earlier columns
        # only if strictly greater, over equal later columns if at least equal.
        wins = (new > max_before) & (new >= max_after)
        return torch.where(own, wins, fixed_right & ~wins).float().mean().item()

    def loss_of(new: torch.Tensor) -> torch.Tensor:
        target = torch.where(own, new, label_score)
        return (torch.logaddexp(lse_fixed, new) - target).mean()

    steps = 0
    new = slot.routing.score(queries)
    acc = accuracy(new)
    while steps < hp.route_steps and acc < 1.0:
        loss = loss_of(new) * hp.route_loss_weight
        _check_finite(loss, "routing")
        opt.zero_grad()
        loss.backward(inputs=params)
        opt.step()
        steps += 1
        new = slot.routing.score(queries)
        acc = accuracy(new)
    del new
    for p in params:
        p.grad = None
    note_slot_change()  # trained in place: the expert's training must route with the result
    return {"route_steps": steps, "route_accuracy": acc}


def _fresh_anchors(older: torch.Tensor, new: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Rows of ``older`` (normalised queries) not equal, up to ``tol`` in cosine, to a row of
    ``new``."""
    if not new.numel() or not older.numel():
        return older
    same = (older @ new.to(older.device).t()).max(dim=1).values >= 1.0 - tol
    return older[~same]


def prompt_variants(edit: EncodedEdit, keep: Collection[int], n: int, dropout: float,
                    gen: torch.Generator) -> List[EncodedEdit]:
    """``n`` copies of ``edit`` whose prompt tokens outside the positions ``keep`` are each
    dropped with probability ``dropout`` (drawn from ``gen``); the target stays whole."""
    prompt, target = edit.input_ids[:edit.prompt_len], edit.input_ids[edit.prompt_len:]
    out = []
    for _ in range(n):
        drop = (torch.rand(len(prompt), generator=gen) < dropout).tolist()
        kept = [t for i, t in enumerate(prompt) if i in keep or not drop[i]]
        out.append(EncodedEdit(kept + target, len(kept)))
    return out


def training_batches(edits: Sequence[EncodedEdit], records: Sequence[Dict], tok, hp,
                     gen: torch.Generator, device) -> List[EditBatch]:
    """The fixed minibatches of an expert's fit (:func:`fixed_minibatches` of
    ``train_batch_size`` edits), each edit followed by its ``hp.prompt_variants`` prompt
    variants: the first token, the subject's (``records[i]["subject"]``, where the prompt
    names it) and the asking position are kept, every other prompt token dropped with
    probability ``hp.prompt_dropout``. Without a record per edit (a slot trained directly
    from encoded edits) no subject is kept."""
    pad = _pad_id(tok)
    if len(records) != len(edits):
        records = [{}] * len(edits)
    groups = fixed_minibatches(len(edits), min(hp.train_batch_size, len(edits)), gen)
    if not hp.prompt_variants:
        return [collate([edits[i] for i in group], pad, device) for group in groups]
    batches = []
    for group in groups:
        rows: List[EncodedEdit] = []
        origin: List[int] = []
        for i in group:
            e = edits[i]
            keep = {0, e.prompt_len - 1,
                    *subject_positions(tok, records[i], e.input_ids[:e.prompt_len])}
            first = len(rows)
            rows += [e] + prompt_variants(e, keep, hp.prompt_variants, hp.prompt_dropout, gen)
            origin += [first] * (len(rows) - first)
        batch = collate(rows, pad, device)
        batch.origin = torch.tensor(origin, device=device)
        batches.append(batch)
    return batches


def fixed_minibatches(n: int, batch_size: int, gen: torch.Generator) -> List[List[int]]:
    """Indices ``0..n-1`` shuffled once with ``gen`` and cut into minibatches.

    The composition is fixed for the whole fit; per epoch only the order of the minibatches
    changes, so cached-activation and full-forward training see identical batches.
    """
    return [idx.tolist() for idx in torch.randperm(n, generator=gen).split(batch_size)]


def batch_routes(model: nn.Module, layer: LEMoELayer, batch: EditBatch) -> Routes:
    """The routing of every position of ``batch``, as the layer decides it in a forward;
    a prompt variant's answer positions (``batch.origin``) take its edit's answer routes,
    as a paraphrase's answer would be served once admitted."""
    with torch.no_grad():
        q = edit_queries(model, layer, batch)
        routes = layer.route(q, layer.queries.valid)
    if batch.origin is None:
        return routes
    # A variant has its edit's target, so its k-th answer position takes the route of its
    # edit's k-th: index every answer position by (row's first, rank in its row).
    rows, cols = batch.anchor_mask.nonzero(as_tuple=True)
    counts = batch.anchor_mask.sum(1)
    first = counts.cumsum(0) - counts
    source = first[batch.origin[rows]] + (torch.arange(len(rows), device=rows.device)
                                          - first[rows])
    expert, gate = routes.expert.clone(), routes.gate.clone()
    expert[rows, cols] = routes.expert[rows[source], cols[source]]
    gate[rows, cols] = routes.gate[rows[source], cols[source]]
    return Routes(expert, gate)


def _fit_expert(model, layer: LEMoELayer, slot_index: int, edits, tok, hp, progress: bool,
                trace: Optional[List[float]]) -> Dict:
    slot = layer.slots[slot_index]
    with float32_masters(slot.expert) as params:
        return _fit_expert_params(model, layer, slot_index, edits, tok, hp, progress, trace,
                                  params)


@contextlib.contextmanager
def float32_masters(module: nn.Module) -> Iterator[List[nn.Parameter]]:
    """``module``'s parameters as float32 master copies for the duration of training.

    A 16-bit host model's expert is stored (and served) in the host's dtype; AdamW on
    16-bit weights loses small updates and its second-moment state underflows, so training
    swaps in float32 copies (the optimizer state is float32 with them) and writes the result
    back, rounded to the stored dtype, when it ends. Float32 parameters are trained as they
    are. Yields the parameters to optimise.
    """
    swapped = []
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None and p.dtype != torch.float32 and p.is_floating_point():
                master = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                owner._parameters[name] = master
                swapped.append((owner, name, p, master))
    try:
        yield list(module.parameters())
    finally:
        with torch.no_grad():
            for owner, name, p, master in swapped:
                p.copy_(master.detach().to(p.dtype))
                owner._parameters[name] = p


def _fit_expert_params(model, layer: LEMoELayer, slot_index: int, edits, tok, hp,
                       progress: bool, trace: Optional[List[float]],
                       params: List[nn.Parameter]) -> Dict:
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    gen = torch.Generator().manual_seed(hp.seed)
    batches = training_batches(edits, layer.slots[slot_index].edits, tok, hp, gen,
                               params[0].device)
    step_loss = (_cached_losses if hp.cached_activations else _full_losses)(
        model, layer, slot_index, batches, hp)
    steps, losses = 0, [math.inf]
    # disable=None: shown on a terminal only (no bar lines in logs and captured output).
    bar = tqdm(total=hp.max_steps, desc="LEMoE expert", leave=False,
               disable=True if not progress or hp.max_steps < 20 else None)
    # A minibatch already under the threshold takes no step, and training ends after an
    # epoch that took none: the expert returned is the one whose losses were measured (one
    # more Adam step after the loss was seen, its momentum still that of the large early
    # gradients, can undo the fit: measured 0.008 -> 0.48).
    stepped = True
    while stepped and steps < hp.max_steps:
        losses, stepped = [], False
        for k in torch.randperm(len(batches), generator=gen).tolist():
            loss = step_loss(k)
            _check_finite(loss, "expert")
            losses.append(loss.item())
            if trace is not None:
                trace.append(losses[-1])
            if losses[-1] < hp.loss_threshold:
                continue
            opt.zero_grad()
            loss.backward(inputs=params)
            opt.step()
            stepped = True
            steps += 1
            bar.update(1)
            if steps >= hp.max_steps:
                break
    bar.close()
    for p in params:
        p.grad = None
    return {"steps": steps, "final_loss": max(losses)}


def _full_losses(model, layer, slot_index, batches, hp) -> Callable[[int], torch.Tensor]:
    """Each step: a full forward of the whole model, routed as :func:`batch_routes` decided
    once per minibatch (nothing the new expert changes feeds the routing)."""
    routes = [batch_routes(model, layer, b) for b in batches]

    def step_loss(k: int) -> torch.Tensor:
        b = batches[k]
        with layer.routes_forced(routes[k]):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           use_cache=False).logits
        return _target_loss(logits, b.labels)
    return step_loss


def _cached_losses(model, layer, slot_index, batches, hp) -> Callable[[int], torch.Tensor]:
    """Each step: the new expert and the blocks above it, from activations captured once."""
    stack = UpperStack(model, layer)
    cached = [stack.capture(b, slot_index, batch_routes(model, layer, b)) for b in batches]
    expert = layer.slots[slot_index].expert

    def step_loss(k: int) -> torch.Tensor:
        return _target_loss(*stack.target_logits(cached[k], expert, hp.expert_scale))
    return step_loss


def _target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens.

    Either the logits ``[B, L, V]`` of a full forward with its ``labels`` ``[B, L]`` (-100
    outside the targets; position ``p`` predicts token ``p + 1``), or logits ``[m, V]``
    already taken at the ``m`` target positions with their token ids ``[m]`` (the
    cached-activation path). Both paths go through here.
    """
    labels = labels.to(logits.device)  # the LM head may sit on another device (device map)
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100)


def _check_queries(anchors: torch.Tensor, owner: torch.Tensor, records: Sequence[Dict]) -> None:
    """ValueError naming the first edit whose routing query is undefined: a zero vector
    has no direction (a prompt of padding tokens only, whose embeddings are zero, under
    ``query_pool: prefix_mean``), and no routing could ever serve it."""
    finite = torch.isfinite(anchors).all(1).cpu()
    if bool(finite.all()):
        return
    i = int(owner[~finite][0])
    what = repr(records[i]["prompt"]) if i < len(records) and "prompt" in records[i] else ""
    raise ValueError(f"edit {i}: prompt {what} gives no routing query (its tokens carry no "
                     "signal, e.g. padding only); nothing was edited")


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"LEMoE {what} training diverged (loss={loss.item()}); the "
                                 f"expert was left as it was before this batch")


def _pad_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0

