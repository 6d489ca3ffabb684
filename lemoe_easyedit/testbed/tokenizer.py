"""The testbed's tokenizer: a LLaMA-style BPE trained on the world's text.

It is a genuine :class:`transformers.LlamaTokenizer` (``▁``-metaspace BPE with byte
fallback, ``<s>`` added at the start, no ``</s>`` at the end), so that EasyEdit's
``BaseEditor`` -- which loads every model whose path contains ``llama`` with
``LlamaTokenizer.from_pretrained`` -- and ``AutoTokenizer`` both rebuild exactly the same
tokenizer from the saved directory.

The BPE is trained with an unlimited merge budget on a closed vocabulary, so every word of
the world is a single token ("word-level" in practice) while any other text still encodes
through characters and the 256 byte-fallback tokens. Merges never cross a space, hence::

    tok(prompt + " " + target).input_ids == tok(prompt).input_ids + <tokens of " " + target>

which is what EasyEdit's metrics assume when they count target tokens as
``len(tok(prompt + " " + target)) - len(tok(prompt))``.
"""

from __future__ import annotations

import json
import string
from typing import Iterable, List

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "target_token_ids", "check_concatenation"]

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_ALPHABET = ["▁"] + sorted(set(string.ascii_letters + string.digits + string.punctuation))


def build_tokenizer(texts: Iterable[str]):
    """Train the tokenizer on ``texts`` and return it as a ``transformers.LlamaTokenizer``.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then the 256 byte tokens, the
    alphabet and the merged words. Padding is on the right.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    core = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    # split=True while training keeps every merge inside one word.
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                  split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no budget: merge until every word is one token
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS + _BYTE_TOKENS,
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    core.train_from_iterator(sorted(set(texts)), trainer=trainer)
    model_json = json.loads(core.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model_json["merges"]]
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=True,
        padding_side="right",
        model_max_length=128,
    )
    tok.padding_side = "right"
    return tok


def target_token_ids(tok, prompt: str, target: str) -> List[int]:
    """Ids of ``target`` when it follows ``prompt`` as ``prompt + " " + target``."""
    full = tok(prompt + " " + target)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    return full[n_prompt:]


def check_concatenation(tok, pairs: Iterable) -> int:
    """Assert the EasyEdit concatenation property on ``(prompt, target)`` pairs; returns count."""
    n = 0
    for prompt, target in pairs:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + " " + target)["input_ids"]
        alone = tok(target)["input_ids"][1:]  # drop <s>; prepend_scheme="first" adds the ▁
        if full[: len(p)] != p or full[len(p):] != alone:
            raise AssertionError(f"inconsistent tokenization for {prompt!r} + {target!r}")
        n += 1
    return n
