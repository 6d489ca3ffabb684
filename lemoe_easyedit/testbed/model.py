"""The testbed's language model: a small ``transformers.LlamaForCausalLM``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ModelSpec", "llama_config", "create_model", "count_parameters"]


@dataclass
class ModelSpec:
    """Shape of the testbed LLaMA (the vocabulary size comes from the tokenizer)."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def llama_config(spec: ModelSpec, tokenizer):
    """A ``LlamaConfig`` of shape ``spec`` whose ``vocab_size`` is ``len(tokenizer)``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        initializer_range=0.02,
    )


def create_model(spec: ModelSpec, tokenizer, seed: int = 0):
    """A freshly initialised float32 ``LlamaForCausalLM`` (initialisation seeded by ``seed``)."""
    from transformers import LlamaForCausalLM

    config = llama_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(torch.float32)
    return model


def count_parameters(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
