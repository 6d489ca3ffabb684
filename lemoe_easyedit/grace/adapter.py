"""The GRACE codebook adaptor: a discrete key-value memory wrapped around one module.

GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023) leaves the model's weights alone and wraps one module (here, by
default, a decoder block's ``mlp.down_proj``). The wrapper holds a codebook of

* **keys**: the module's input at the last token of an edit prompt,
* **values**: trainable vectors that *replace* the module's output where a key is hit,
* **deferral radii** ``epsilon`` (one per key) and the **label** (target tokens) of each key.

An input token hits the codebook when its nearest key (Euclidean distance) lies within that
key's radius; otherwise the module's own output passes through unchanged, so inputs far from
every key are untouched. On a new edit with query ``q`` and label ``y``:

* no key within ``eps_init + epsilon_j`` of ``q``: add key ``q`` with radius ``eps_init``;
* nearest key ``j`` close enough and **same label**: expand ``epsilon_j`` to cover ``q``
  (``coverage``; or move the key halfway to ``q``, ``moving_average``) and keep training
  value ``j``;
* nearest key ``j`` close enough and **different label**: add key ``q`` and split the space
  between them: both radii become at most half their distance;

then the chosen key's value is trained by gradient descent (Adam, ``edit_lr``, ``n_iter``
steps) so that the model produces the target with it, every other parameter frozen.

Choices this implementation makes (the paper targets T5 / GPT-2 and leaves them open):

* **Every token is a query.** The lookup runs at every position, so teacher-forced scoring of
  ``prompt + target`` (EasyEdit's metric), generation with or without a KV cache and the
  training of the value all see the same replacement at the last prompt token: no
  ``key_id`` bookkeeping that depends on which sequence was seen last.
* ``replace_last``: only a hit token's output is replaced. ``replace_all``: the causal
  reading of the paper's "replace all": the hit token and every later token of the sequence
  (until another hit) get the value; with a KV cache the active value is carried over to the
  next decoding step.
* Labels are compared as token-id sequences of the target (not as a mean of label ids).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

#: ``reg: early_stop`` ends value training once the target loss is below this.
EARLY_STOP_LOSS = 0.01
#: Relative (and absolute) margin by which an expanded radius covers the new query.
COVER_MARGIN = 1e-4
#: A query this close to a key (relative to the key's norm) is that key: float rounding of
#: the same prompt run in another batch.
SAME_KEY = 1e-5


class GraceAdapter(nn.Module):
    """Wraps ``layer``; ``forward(x)`` = ``layer(x)`` with codebook hits replaced.

    The codebook tensors are parameters (``keys``, ``epsilons``, ``active`` frozen;
    ``values`` trainable), so that EasyEdit's release can restore an edit by writing saved
    tensors back into named parameters (see ``apply_grace_to_model``).
    """

    def __init__(self, layer: nn.Module, module_path: str, eps_init: float,
                 replacement: str = "replace_last", eps_expand: str = "coverage") -> None:
        super().__init__()
        self.layer = layer
        self.module_path = module_path
        self.eps_init = float(eps_init)
        self.replacement = replacement
        self.eps_expand = eps_expand
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise ValueError(f"GRACE wraps a module with a weight; {module_path} has none")
        device = weight.device
        self.key_dim: Optional[int] = None
        self.value_dim: Optional[int] = None
        self.keys = nn.Parameter(torch.zeros(0, 0, device=device), requires_grad=False)
        self.values = nn.Parameter(torch.zeros(0, 0, device=device), requires_grad=False)
        self.epsilons = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.active = nn.Parameter(torch.zeros(0, device=device), requires_grad=False)
        self.key_labels: List[Tuple[int, ...]] = []
        self.key_edits: List[List[int]] = []
        # Set while a value is trained: (key index, trainable vector, key position).
        self._training: Optional[Tuple[int, nn.Parameter, int]] = None
        # replace_all with a KV cache: value index active at the end of the last call.
        self._carry: Optional[torch.Tensor] = None
        self._continuing = False
        self.last_hits: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ codebook

    @property
    def num_keys(self) -> int:
        return int(self.keys.shape[0])

    def _set(self, keys, values, epsilons, active) -> None:
        dev = self.layer.weight.device
        self.keys = nn.Parameter(keys.detach().float().to(dev), requires_grad=False)
        self.values = nn.Parameter(values.detach().float().to(dev), requires_grad=False)
        self.epsilons = nn.Parameter(epsilons.detach().float().to(dev), requires_grad=False)
        self.active = nn.Parameter(active.detach().float().to(dev), requires_grad=False)

    def nearest(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, the nearest active key for each row of ``query``
        (``[N, D]``); distance ``inf`` when the codebook is empty."""
        q = query.detach().float().reshape(-1, query.shape[-1])
        if self.num_keys == 0:
            return (torch.full((q.shape[0],), float("inf"), device=q.device),
                    torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        # Exact differences, not the |a|^2 + |b|^2 - 2ab shortcut cdist takes for large
        # inputs: that one is off by ~0.1 at the norms of real activations, which decides
        # whether a query at a key (distance 0) or at a radius' edge is a hit.
        d = torch.cdist(q, self.keys.to(q.device), compute_mode="donot_use_mm_for_euclid_dist")
        d = d.masked_fill(self.active.to(q.device)[None, :] < 0.5, float("inf"))
        return d.min(dim=1)

    def update_codebook(self, query: torch.Tensor, label: Sequence[int],
                        init_value: torch.Tensor, edit_id: int) -> Dict[str, object]:
        """GRACE's codebook rule for one edit; returns the key to train and what happened."""
        query = query.detach().float().reshape(1, -1)
        init_value = init_value.detach().float().reshape(1, -1)
        label = tuple(int(t) for t in label)
        if self.num_keys == 0:
            self.key_dim, self.value_dim = query.shape[1], init_value.shape[1]
            return self._add(query, init_value, self.eps_init, label, edit_id, "add")
        dist, j = self.nearest(query)
        dist, j = float(dist[0]), int(j[0])
        eps_j = float(self.epsilons[j])
        if dist > self.eps_init + eps_j:
            return self._add(query, init_value, self.eps_init, label, edit_id, "add",
                             nearest=dist)
        if self.key_labels[j] != label:
            if dist <= SAME_KEY * (1.0 + float(self.keys[j].norm())):
                # The same key (the same prompt edited again) with a new label: splitting
                # would leave both radii at zero and no query would ever hit either key.
                # The later edit replaces the earlier one in place.
                with torch.no_grad():
                    self.values[j] = init_value[0].to(self.values.device)
                self.key_labels[j] = label
                self.key_edits[j] = [edit_id]
                return {"key": j, "action": "replace", "nearest": dist}
            # Conflict: a new key, and neither radius may reach past the midpoint.
            half = dist / 2.0 * (1.0 - COVER_MARGIN)
            with torch.no_grad():
                self.epsilons[j] = min(eps_j, half)
            return self._add(query, init_value, min(self.eps_init, half), label, edit_id,
                             "split", nearest=dist, other=j)
        action = "reuse"
        if dist > eps_j:
            action = "expand"
            with torch.no_grad():
                if self.eps_expand in ("moving_average", "moving_avg"):
                    self.keys[j] = 0.5 * self.keys[j] + 0.5 * query[0].to(self.keys.device)
                # Cover the query; the small margin keeps it covered when the same prompt
                # is run again inside a longer sequence (float rounding differs slightly).
                self.epsilons[j] = dist * (1 + COVER_MARGIN) + COVER_MARGIN
        self.key_edits[j].append(edit_id)
        return {"key": j, "action": action, "nearest": dist}

    def _add(self, query, value, eps, label, edit_id, action, **info) -> Dict[str, object]:
        if not eps > 0:
            raise ValueError(f"GRACE: a key's deferral radius must be positive, got {eps} "
                             f"({action} of edit {edit_id})")
        dev = self.layer.weight.device
        keys = torch.cat([self.keys.reshape(-1, query.shape[1]), query.to(dev)])
        values = torch.cat([self.values.reshape(-1, value.shape[1]), value.to(dev)])
        epsilons = torch.cat([self.epsilons, torch.tensor([float(eps)], device=dev)])
        active = torch.cat([self.active, torch.ones(1, device=dev)])
        self._set(keys, values, epsilons, active)
        self.key_labels.append(label)
        self.key_edits.append([edit_id])
        return {"key": self.num_keys - 1, "action": action, **info}

    def prune_inactive(self) -> None:
        """Drop keys switched off by a restore (EasyEdit's release)."""
        keep = (self.active > 0.5).nonzero().flatten().tolist()
        if len(keep) == self.num_keys:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self._set(self.keys[idx], self.values[idx], self.epsilons[idx], self.active[idx])
        self.key_labels = [self.key_labels[i] for i in keep]
        self.key_edits = [self.key_edits[i] for i in keep]

    def snapshot(self) -> Dict[str, object]:
        return {"keys": self.keys.detach().clone(), "values": self.values.detach().clone(),
                "epsilons": self.epsilons.detach().clone(),
                "active": self.active.detach().clone(),
                "labels": list(self.key_labels), "edits": [list(e) for e in self.key_edits],
                "dims": (self.key_dim, self.value_dim)}

    def load_snapshot(self, snap: Dict[str, object]) -> None:
        self._set(snap["keys"], snap["values"], snap["epsilons"], snap["active"])
        self.key_labels = list(snap["labels"])
        self.key_edits = [list(e) for e in snap["edits"]]
        self.key_dim, self.value_dim = snap["dims"]

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(x, *args, **kwargs)
        if self.num_keys == 0 or x.dim() != 3:
            self.last_hits = None
            return out
        bsz, seq, _ = x.shape
        dist, idx = self.nearest(x.reshape(bsz * seq, -1))
        eps = self.epsilons.to(dist.device)[idx]
        hit = (dist <= eps).reshape(bsz, seq)
        idx = idx.reshape(bsz, seq)
        chosen = torch.where(hit, idx, torch.full_like(idx, -1))
        if self._training is not None:
            # The edit being trained owns its key token, whatever the rounding says.
            j, _, pos = self._training
            if pos < seq:
                chosen[:, pos] = j
        if self.replacement == "replace_all":
            # Carry the most recent hit forward along the sequence (and across KV-cache steps).
            start = torch.full((bsz,), -1, dtype=torch.long, device=idx.device)
            if self._continuing and self._carry is not None and self._carry.shape[0] == bsz:
                start = self._carry.to(idx.device)
            filled = []
            cur = start
            for t in range(seq):
                cur = torch.where(chosen[:, t] >= 0, chosen[:, t], cur)
                filled.append(cur)
            chosen = torch.stack(filled, dim=1)
            self._carry = chosen[:, -1].detach()
        self.last_hits = hit.detach()
        if not bool((chosen >= 0).any()):
            return out
        values = self.values
        if self._training is not None:
            j, vec, _ = self._training
            values = torch.cat([values[:j], vec.reshape(1, -1), values[j + 1:]])
        safe = chosen.clamp(min=0)
        replacement = values.to(out.dtype)[safe]  # [B, L, Dout]
        return torch.where((chosen >= 0).unsqueeze(-1), replacement, out)


def find_grace(model: nn.Module) -> Optional[GraceAdapter]:
    """The model's GRACE adaptor, or None."""
    for module in model.modules():
        if isinstance(module, GraceAdapter):
            return module
    return None
