"""The realfact tokenizer: a LLaMA-style byte-fallback BPE with a fixed vocabulary budget.

Unlike the testbed's closed world, real names and NQ answers are an open vocabulary: the BPE
gets a budget (6,144 by default, where a prototype found the EasyEdit concatenation property
``tok(p + " " + t) == tok(p) + tok(" " + t)`` to hold for every true and new target), so rare
words split into subwords, and any other text still encodes through the 256 byte tokens.
The result is a genuine ``transformers.LlamaTokenizer`` (``<s>`` prepended, no ``</s>``
appended, right padding), which is what EasyEdit's ``BaseEditor`` loads for a path
containing ``llama``.
"""

from __future__ import annotations

import json
from typing import Iterable, List, Sequence, Tuple

from ..testbed.tokenizer import SPECIAL_TOKENS

__all__ = ["DEFAULT_VOCAB", "build_tokenizer", "concatenation_failures"]

#: Vocabulary budget of the default build (specials and byte tokens included).
DEFAULT_VOCAB = 6144
_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB,
                    model_max_length: int = 128):
    """Train a BPE of ``vocab_size`` tokens on ``texts``; return a ``LlamaTokenizer``.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, the 256 byte tokens, then the
    characters and merges. The texts are de-duplicated and sorted first, so the result
    depends on the set of texts only (not their order).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    unk, bos, eos, pad = SPECIAL_TOKENS
    core = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
    # Metaspace with split=True while training: merges never cross a word boundary, which is
    # what makes the concatenation property hold.
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                  split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS + _BYTE_TOKENS,
                                  show_progress=False)
    core.train_from_iterator(sorted(set(texts)), trainer=trainer)
    model_json = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model_json["merges"]]
    tok = LlamaTokenizer(vocab=model_json["vocab"], merges=merges, unk_token=unk,
                         bos_token=bos, eos_token=eos, pad_token=pad, add_bos_token=True,
                         add_eos_token=False, legacy=False, add_prefix_space=True,
                         padding_side="right", model_max_length=model_max_length)
    tok.padding_side = "right"
    return tok


def concatenation_failures(tok, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The ``(prompt, target)`` pairs for which ``tok(prompt + " " + target)`` is not
    ``tok(prompt)`` followed by the target's own tokens (EasyEdit counts target tokens as
    the difference of the two lengths, so such a pair would be scored on wrong tokens)."""
    prompts = [p for p, _ in pairs]
    fulls = [p + " " + t for p, t in pairs]
    targets = [t for _, t in pairs]
    p_ids = tok(prompts)["input_ids"]
    f_ids = tok(fulls)["input_ids"]
    t_ids = tok(targets)["input_ids"]
    bad = []
    for pair, p, f, t in zip(pairs, p_ids, f_ids, t_ids):
        # tok(target) = <s> + "▁target" pieces (the prefix space is added to the first word)
        if f[:len(p)] != p or f[len(p):] != t[1:]:
            bad.append(pair)
    return bad
