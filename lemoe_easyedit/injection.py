"""Model-level injector: put a :class:`LEMoELayer` in place of one FFN, find it, take it out."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .layer import LEMoELayer
from .model_families import family_of, get_submodule, mlp_path, proj_weight
from .routing import SUBJECT_ROUTER, QueryBuilder


def find_adaptor(model: nn.Module) -> Optional[LEMoELayer]:
    """The model's LEMoE layer, or None if it has not been edited with LEMoE."""
    for module in model.modules():
        if isinstance(module, LEMoELayer):
            return module
    return None


def inject_adaptor(model: nn.Module, hparams) -> LEMoELayer:
    """Return the model's LEMoE layer, creating it at ``hparams.layer`` if needed.

    The host FFN becomes ``<mlp path>.base_layer`` and is never modified. A forward pre-hook
    on the whole model computes the routing queries (see :class:`QueryBuilder`).
    """
    existing = find_adaptor(model)
    if existing is not None:
        if existing.layer_index != hparams.layer:
            raise ValueError(f"this model already has a LEMoE adaptor at layer "
                             f"{existing.layer_index}; hparams ask for layer {hparams.layer}")
        existing.hparams = hparams
        existing.queries.track_ids = hparams.router == SUBJECT_ROUTER
        return existing
    fam = family_of(model)
    path = mlp_path(model, hparams.layer)
    host = get_submodule(model, path)
    hidden = proj_weight(getattr(host, fam.in_projs[0]), fam).shape[1]
    queries = QueryBuilder.for_model(model, hparams)
    layer = LEMoELayer(host, fam, hparams, queries, hidden)
    layer.layer_index = hparams.layer
    layer.module_path = path
    parent_path, name = path.rsplit(".", 1)
    setattr(get_submodule(model, parent_path), name, layer)
    layer.hook_handle = model.register_forward_pre_hook(queries, with_kwargs=True)
    return layer


def remove_adaptor(model: nn.Module) -> bool:
    """Put the host FFN back and drop the routing hook; True if there was an adaptor."""
    layer = find_adaptor(model)
    if layer is None:
        return False
    layer.hook_handle.remove()
    parent_path, name = layer.module_path.rsplit(".", 1)
    setattr(get_submodule(model, parent_path), name, layer.base_layer)
    return True
