"""Model-family facts: where the FFN of a layer is and how its projections are named.

This table is the only place in the package that knows about architectures. Everything else
asks :func:`family_of` for a :class:`ModelFamily` and reads its fields.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelFamily:
    """How one architecture family lays out its decoder FFN.

    ``layers_path`` is the dotted path of the ``ModuleList`` of decoder blocks, ``mlp_name``
    the FFN's attribute inside a block. ``gated`` families compute
    ``down(act(gate(x)) * up(x))`` (LLaMA style); the others ``out(act(in(x)))``.
    ``conv1d`` marks GPT-2's transposed ``Conv1D`` weights (``[in, out]`` instead of
    ``[out, in]``).

    ``final_norm`` is the dotted path of the norm between the last decoder block and the LM
    head, and ``attn_name`` the attention's attribute inside a block (the module templates
    ROME/MEMIT hparams need). Every family listed here adds its FFN output to the residual
    stream, and its LM head (``get_output_embeddings()``) reads ``final_norm``'s output
    directly; cached-activation training (:mod:`.activation_cache`) relies on both.
    """

    name: str
    model_types: Tuple[str, ...]
    layers_path: str
    mlp_name: str
    in_projs: Tuple[str, ...]
    out_proj: str
    act_name: str
    gated: bool
    final_norm: str
    attn_name: str
    conv1d: bool = False
    num_layers_key: str = "num_hidden_layers"


FAMILIES: Dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", "mlp",
                    ("gate_proj", "up_proj"), "down_proj", "act_fn", gated=True,
                    final_norm="model.norm", attn_name="self_attn"),
        ModelFamily("gpt2", ("gpt2",), "transformer.h", "mlp", ("c_fc",), "c_proj", "act",
                    gated=False, final_norm="transformer.ln_f", attn_name="attn", conv1d=True,
                    num_layers_key="n_layer"),
        ModelFamily("gptj", ("gptj",), "transformer.h", "mlp", ("fc_in",), "fc_out", "act",
                    gated=False, final_norm="transformer.ln_f", attn_name="attn",
                    num_layers_key="n_layer"),
    )
}

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)


def family_of(model: nn.Module) -> ModelFamily:
    """Return the family of a transformers causal LM, or raise ValueError naming its type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r}; LEMoE supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model``."""
    return len(get_submodule(model, family_of(model).layers_path))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that names the missing path."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"model has no submodule {path!r}") from exc


def mlp_path(model: nn.Module, layer: int) -> str:
    """Dotted path of the FFN of decoder block ``layer``; checks the index."""
    fam = family_of(model)
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an index in [0, {n - 1}] for this model, got {layer!r}")
    return f"{fam.layers_path}.{layer}.{fam.mlp_name}"


def ffn_width(mlp: nn.Module, fam: ModelFamily) -> int:
    """Hidden (intermediate) width of a host FFN."""
    w = getattr(mlp, fam.out_proj).weight
    return w.shape[0] if fam.conv1d else w.shape[1]


def proj_weight(proj: nn.Module, fam: ModelFamily):
    """A projection's weight in ``[out, in]`` layout, whatever the family stores."""
    return proj.weight.t() if fam.conv1d else proj.weight


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device where a device map
    placed it (its weights may rest on ``meta`` when offloaded), else its weights' device."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) \
                else torch.device("cuda", device)
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def materialised(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every weight readable: accelerate-offloaded (CPU or disk) weights are
    loaded onto the execution device for the duration (nothing to do without accelerate
    or offloading)."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:
        yield module
        return
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield module


#: The name of a causal LM forward's KV cache argument: ``cache`` from transformers 5 on,
#: ``past_key_values`` before.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cached_length(forward_kwargs: Dict) -> int:
    """How many positions the KV cache passed to a model's forward already holds (0: none,
    or a new sequence), from the forward's bound arguments."""
    for name in CACHE_ARGUMENTS:
        past = forward_kwargs.get(name)
        if past is None:
            continue
        if hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
        if isinstance(past, (tuple, list)) and past and past[0] is not None:
            return int(past[0][0].shape[-2])
    return 0
