"""Loading the unedited model and tokenizer of a method's hparams, as EasyEdit's ``BaseEditor``
does here, and small facts about a loaded model."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .. import easyedit


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
    kwargs = {dtype_key: easyedit.hparams_dtype(hparams)}
    if parallel and on_device:
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.eval()
    tok = load_tokenizer(hparams, name)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if hparams.alg_name in ("ROME", "MEMIT") else "left"
    if on_device and not parallel:
        model.to(easyedit.resolve_device(getattr(hparams, "device", None)))
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

