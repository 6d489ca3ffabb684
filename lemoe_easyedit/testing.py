"""Tiny, locally built models and tokenizers for tests, benchmarks and examples.

Nothing here touches the network: tokenizers are trained with the ``tokenizers`` library on
text given by the caller, and models are randomly initialised transformers models whose
``vocab_size`` equals ``len(tokenizer)``. Directories are named after the family
(``tiny-llama``, ``tiny-gpt2``...) so that EasyEdit's ``BaseEditor``, which picks the model
class by a substring of the path, loads them like any hub model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional

import torch

#: Families a tiny model can be built for, with the directory name each one gets.
TINY_FAMILIES = {
    "llama": "tiny-llama",
    "mistral": "tiny-mistral",
    "qwen2": "tiny-qwen2",
    "gpt2": "tiny-gpt2",
    "gptj": "tiny-gpt-j",
}

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<s>"]

DEFAULT_CORPUS = [
    "The capital of France is Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of French.",
    "What university did Watts Humphrey attend? Illinois Institute of Technology.",
    "The Eiffel Tower is located in the city of Paris in Europe.",
    "nq question: who wrote the declaration of independence? Thomas Jefferson.",
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    The result has ``<|endoftext|>`` as eos/bos/unk and ``<pad>`` as pad token, pads on the
    right, and adds no special tokens when encoding (like GPT-2's tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tok.padding_side = "right"
    return tok


def tiny_config(family: str, vocab_size: int, *, hidden: int = 32, layers: int = 4,
                intermediate: int = 64, heads: int = 4, max_positions: int = 128):
    """A transformers config of ``family`` small enough to run anywhere in milliseconds."""
    from transformers import (GPT2Config, GPTJConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)

    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                   num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=heads, max_position_embeddings=max_positions,
                   bos_token_id=2, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    if family == "gpt2":
        # GPT-2's default init (std 0.02, tied embeddings) gives a random model near-uniform
        # logits that no small edit can move; a wider init makes it behave like a trained one.
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate, n_positions=max_positions,
                          initializer_range=0.2,
                          bos_token_id=0, eos_token_id=0)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate, n_positions=max_positions, rotary_dim=4,
                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    raise ValueError(f"family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")


def build_tiny_model(family: str, directory: os.PathLike, texts: Optional[List[str]] = None,
                     seed: int = 0, **config_kwargs) -> Path:
    """Build and save a tiny randomly initialised ``family`` model with its tokenizer.

    Returns the saved directory, ``directory/<tiny-family>``, loadable with
    ``from_pretrained`` and by EasyEdit's ``BaseEditor``.
    """
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    out = Path(directory) / TINY_FAMILIES[family]
    tok = build_tokenizer(texts or DEFAULT_CORPUS)
    config = tiny_config(family, len(tok), **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
