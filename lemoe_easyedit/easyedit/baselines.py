"""What the release's ROME and MEMIT need here, loaded on their first call (the comparisons
run them; LEMoE never does).

* ``nethook.Trace`` presents a decoder block's bare-tensor output as the 1-tuple easyeditor's
  callers index into, and hands the tensor back to the model.
* ROME/MEMIT run with the tokenizer padding on the right.
* ROME/MEMIT second-moment statistics come from a local text file (``mom2_dataset``), cached
  under ``stats_dir``; nothing is downloaded and non-finite statistics are neither returned
  nor left in the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from .loading import _rebind_everywhere, _submodule

# ------------------------------------------------------------- nethook.Trace (item 4)


def _is_block_name(layer: Optional[str]) -> bool:
    """``model.layers.3`` / ``transformer.h.3``: a whole decoder block."""
    return isinstance(layer, str) and layer.rsplit(".", 1)[-1].isdigit()


def _make_trace_class(nethook: types.ModuleType) -> type:
    base = nethook.Trace

    class Trace(base):
        """``nethook.Trace`` for transformers whose decoder blocks return a bare tensor.

        easyeditor (written for tuple-returning blocks) indexes ``output[0]`` both in
        ``edit_output`` callbacks and in ``.output``; for a block layer the tensor is
        shown to it as a 1-tuple and whatever the callback returns is unwrapped again
        before it goes back to the model."""

        _lemoe_patched = True

        def __init__(self, module, layer=None, retain_output=True, retain_input=False,
                     clone=False, detach=False, retain_grad=False, edit_output=None,
                     stop=False):
            if not _is_block_name(layer):
                super().__init__(module, layer, retain_output=retain_output,
                                 retain_input=retain_input, clone=clone, detach=detach,
                                 retain_grad=retain_grad, edit_output=edit_output, stop=stop)
                return
            self.layer = layer
            self.stop = stop
            target = nethook.get_module(module, layer)

            def hook(_module, inputs, output):
                bare = isinstance(output, torch.Tensor)
                shown = (output,) if bare else output
                if retain_input:
                    self.input = nethook.recursive_copy(
                        inputs[0] if len(inputs) == 1 else inputs,
                        clone=clone, detach=detach, retain_grad=False)
                if edit_output:
                    shown = nethook.invoke_with_optional_args(
                        edit_output, output=shown, layer=self.layer)
                if retain_output:
                    self.output = nethook.recursive_copy(
                        shown, clone=clone, detach=detach, retain_grad=retain_grad)
                    if retain_grad:
                        # Same trivial copy as the original: lets in-place ops follow.
                        shown = nethook.recursive_copy(self.output, clone=True, detach=False)
                if stop:
                    raise nethook.StopForward()
                if bare and isinstance(shown, (tuple, list)):
                    return shown[0]
                return shown

            self.registered_hook = target.register_forward_hook(hook)

    Trace.__qualname__ = Trace.__name__ = "Trace"
    Trace.__module__ = base.__module__
    return Trace


# ----------------------------------------------------------------- padding (item 5)


def with_right_padding(apply_fn: Callable) -> Callable:
    @functools.wraps(apply_fn)
    def apply_with_right_padding(model, tok, *args, **kwargs):
        # ROME/MEMIT locate the subject/target tokens assuming right padding; transformers
        # 5 Llama tokenizers pad left by default, which makes them produce NaN.
        previous = getattr(tok, "padding_side", None)
        if previous is not None:
            tok.padding_side = "right"
        try:
            return apply_fn(model, tok, *args, **kwargs)
        finally:
            if previous is not None:
                tok.padding_side = previous

    apply_with_right_padding._lemoe_patched = True
    return apply_with_right_padding


# --------------------------------------------------------------- statistics (item 6)


_TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".text")


def _read_local_texts(path: Path) -> List[str]:
    """Documents of a local text file: .txt one per non-empty line; .json a list of
    strings or of objects with a "text" field; .jsonl one such item per line."""

    def as_text(item, where):
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return item["text"]
        raise ValueError(f"{where}: expected a string or an object with a 'text' string")

    suffix = path.suffix.lower()
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json mom2_dataset must hold a JSON list")
        texts = [as_text(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    texts.append(as_text(json.loads(line), f"{path}:{lineno}"))
    else:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"mom2_dataset {path} holds no text")
    return texts


def _local_text_file(ds_name: Any) -> Optional[Path]:
    """The file ``mom2_dataset`` names, or None for a hub dataset name."""
    text = os.fspath(ds_name) if isinstance(ds_name, (str, os.PathLike)) else None
    if not text:
        return None
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return path.resolve()
    looks_like_path = path.suffix.lower() in _TEXT_SUFFIXES or text.startswith((".", "/", "~"))
    if looks_like_path:
        raise ValueError(f"mom2_dataset file {text!r} does not exist")
    return None


def _dataset_cache_name(path: Path) -> str:
    """Short stable name for a local statistics corpus: file stem + content hash, so that
    editing the file invalidates the cache and the path never ends up in a file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "corpus"
    return f"{stem}-{digest.hexdigest()[:10]}"


def _hub_dataset_error(ds_name: Any, cache_file: Path) -> ValueError:
    return ValueError(
        f"mom2_dataset={ds_name!r} names a hub dataset, and statistics are never "
        "downloaded. Set `mom2_dataset` in the hparams to a local text file (.txt: one "
        "document per non-empty line; .json/.jsonl: strings or objects with a 'text' "
        f"field). A precomputed cache under stats_dir is used when present: {cache_file} "
        "does not exist.")


def _load_local_dataset(path, *args, **kwargs):
    """Stand-in for ``datasets.load_dataset`` in layer_stats: local files only."""
    local = _local_text_file(path)
    if local is None:
        raise ValueError(
            f"{path!r} is not a local file; lemoe_easyedit computes statistics from a local "
            "text file only (set `mom2_dataset` to one)")
    return {"train": [{"text": t} for t in _read_local_texts(local)]}


def _max_positions(config) -> int:
    for attr in ("n_positions", "max_sequence_length", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise NotImplementedError(f"cannot tell the context length of {type(config).__name__}")


def _input_device(model) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _check_finite_stats(stat, cache_file: Path) -> None:
    import numpy as np

    state = stat.state_dict()
    counts = [v for k, v in state.items() if k.rsplit(".", 1)[-1] == "count"]
    bad = [k for k, v in state.items()
           if isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all()]
    if bad or any(int(c) == 0 for c in counts):
        if cache_file.exists():
            cache_file.unlink()
        what = f"non-finite values in {', '.join(bad)}" if bad else "no tokens"
        raise FloatingPointError(
            f"layer statistics for the cache {cache_file} have {what}; the cache file was "
            "removed. Check the model in float32, the tokenizer padding and mom2_dataset.")


def _local_layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect,
                       model_name=None, sample_size=None, precision=None, batch_tokens=None,
                       download=True, progress=None, force_recompute=False, hparams=None):
    """Drop-in for the release's ``layer_stats``: same cache layout under ``stats_dir``
    for hub names (so existing caches are used), a local-text corpus otherwise, no
    downloads, no DataLoader workers, inputs on the model's device, finite results only.
    """
    ls = _submodule("models.rome.layer_stats")
    rs = _submodule("util.runningstats")
    nethook = _submodule("util.nethook")

    npos = _max_positions(model.config)
    if batch_tokens is None:
        batch_tokens = npos * 3  # tokens per sub-batch, as in the release
    precision = precision or "float64"
    dtype = getattr(torch, precision)
    size_suffix = "" if sample_size is None else f"_{sample_size}"
    if batch_tokens < npos:
        size_suffix = f"_t{batch_tokens}" + size_suffix
    if model_name is None:
        model_name = model.config._name_or_path.replace("/", "_")
    local = _local_text_file(ds_name)
    ds_key = _dataset_cache_name(local) if local is not None else str(ds_name)
    cache_file = (Path(stats_dir) / model_name / f"{ds_key}_stats" /
                  f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_suffix}.npz")

    def dataset():  # only called by tally when the cache cannot be used
        if local is None:
            raise _hub_dataset_error(ds_name, cache_file)
        texts = _read_local_texts(local)
        return ls.TokenizedDataset([{"text": t} for t in texts], tokenizer,
                                   maxlen=min(npos, batch_tokens))

    device = _input_device(model)
    stat = rs.CombinedStat(**{k: ls.STAT_TYPES[k]() for k in to_collect})
    loader = rs.tally(
        stat, dataset, cache=None if force_recompute else cache_file,
        sample_size=sample_size, batch_size=100, collate_fn=ls.length_collation(batch_tokens),
        pin_memory=device.type == "cuda", random_sample=1,
        # Workers would fork a process holding the model for a few hundred short texts.
        num_workers=0,
    )
    if progress is not None:
        loader = progress(loader, total=-(-sample_size // 100) if sample_size else None)
    with torch.no_grad():
        for batch_group in loader:
            for batch in batch_group:
                batch = ls.dict_to_(batch, device)
                with nethook.Trace(model, layer_name, retain_input=True, retain_output=False,
                                   stop=True) as tr:
                    model(**batch)
                feats = ls.flatten_masked_batch(tr.input, batch["attention_mask"])
                stat.add(feats.to(dtype=dtype))
    _check_finite_stats(stat, cache_file)
    return stat


_local_layer_stats._lemoe_patched = True


def patch_release() -> None:
    """Rebind ``nethook.Trace`` and ``layer_stats`` everywhere in the loaded release
    (idempotent)."""
    nethook = _submodule("util.nethook")
    if not getattr(nethook.Trace, "_lemoe_patched", False):
        _rebind_everywhere(nethook.Trace, _make_trace_class(nethook))
    layer_stats_mod = _submodule("models.rome.layer_stats")
    if not getattr(layer_stats_mod.layer_stats, "_lemoe_patched", False):
        _rebind_everywhere(layer_stats_mod.layer_stats, _local_layer_stats)
    layer_stats_mod.load_dataset = _load_local_dataset
