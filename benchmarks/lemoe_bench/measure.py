"""What the bench measures in a process: memory, rewrite accuracy and serving latency."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import time
import warnings
from typing import Dict, Optional, Sequence

# ----------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the peak
        return _peak_rss_bytes()


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _anon_rss_bytes() -> Optional[int]:
    """Resident anonymous memory (heap and other private allocations) of this process.

    Unlike the whole RSS it leaves out file-backed pages: the code of torch's shared
    libraries is paged in as new kernels first run, which grows the RSS by megabytes without
    allocating anything.
    """
    return _status_bytes("RssAnon")


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started.

    On Linux ``VmHWM`` (``ru_maxrss`` would include the parent's peak from before exec).
    """
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _settle() -> None:
    """Collect garbage and hand freed heap pages back, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects."""
    import torch

    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.is_meta:
                    continue
                st = obj.untyped_storage()
                key = (st.device.type, st.data_ptr())
            except Exception:  # noqa: BLE001 - odd tensor subclasses
                continue
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def _memory_point() -> Dict[str, int]:
    _settle()
    return {"rss": _rss_bytes(), "anon": _anon_rss_bytes(), "tensors": _live_tensor_bytes()}


def _rewrite_accuracy(model, tok, requests: Sequence[dict], batch: int = 32) -> float:
    """Teacher-forced accuracy of the target tokens after each prompt (EasyEdit's Rel)."""
    import torch

    from lemoe_easyedit.training import _pad_id, collate, encode_edits

    hits = total = 0
    device = model.get_input_embeddings().weight.device
    for i in range(0, len(requests), batch):
        edits = encode_edits(tok, requests[i:i + batch], 10 ** 6)
        b = collate(edits, _pad_id(tok), device)
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        pred, lab = logits[:, :-1].argmax(-1), b.labels[:, 1:]
        m = lab != -100
        hits += int(((pred == lab) & m).sum())
        total += int(m.sum())
    return hits / max(total, 1)


# ----------------------------------------------------------------------- serving


@contextlib.contextmanager
def unedited(model):
    """The model with its LEMoE adaptor swapped out (host FFN back, routing hook off)."""
    from lemoe_easyedit.injection import find_adaptor
    from lemoe_easyedit.model_families import get_submodule

    layer = find_adaptor(model)
    if layer is None:
        yield model
        return
    parent_path, name = layer.module_path.rsplit(".", 1)
    parent = get_submodule(model, parent_path)
    setattr(parent, name, layer.base_layer)
    layer.hook_handle.remove()
    try:
        yield model
    finally:
        setattr(parent, name, layer)
        layer.hook_handle = model.register_forward_pre_hook(layer.queries, with_kwargs=True)


def _serving(model, tok, prompts: Sequence[str], gen_tokens: int, repeats: int) -> dict:
    """Timings of the edited and the unedited model, finely interleaved.

    Every unit of work (one prompt's forward, the padded batch's forward, one prompt's
    generation) is timed ``repeats`` times with and without the adaptor, back to back in
    alternating order, and its best time is kept: on a shared machine the minimum is what
    the code costs, the rest is other processes.
    """
    import torch

    singles = [tok(p, return_tensors="pt") for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    batch = tok(list(prompts), return_tensors="pt", padding=True)
    tok.padding_side = side
    gens = singles[: max(1, len(singles) // 2)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def forward(x):
        return lambda: model(**x, use_cache=False)

    def generate(x):
        return lambda: model.generate(**x, max_new_tokens=gen_tokens,
                                      min_new_tokens=gen_tokens, do_sample=False,
                                      pad_token_id=pad)

    units = {"forward": [forward(x) for x in singles], "batch_forward": [forward(batch)],
             "generate": [generate(x) for x in gens]}
    totals = {}
    with torch.no_grad():
        for kind, fns in units.items():
            best = {False: [float("inf")] * len(fns), True: [float("inf")] * len(fns)}
            for rep in range(repeats + 1):  # round 0 warms up and is not counted
                for j, fn in enumerate(fns):
                    for edited in ((False, True) if (rep + j) % 2 else (True, False)):
                        with (contextlib.nullcontext() if edited else unedited(model)):
                            t0 = time.perf_counter()
                            fn()
                            dt = time.perf_counter() - t0
                        if rep:
                            best[edited][j] = min(best[edited][j], dt)
            totals[kind] = (sum(best[False]), sum(best[True]))
    n_tok = gen_tokens * len(gens)
    (fb, fe), (bb, be), (gb, ge) = totals["forward"], totals["batch_forward"], totals["generate"]
    return {
        "forward_ms_base": 1e3 * fb / len(singles), "forward_ms": 1e3 * fe / len(singles),
        "forward_ratio": fe / fb,
        "batch_forward_ms_base": 1e3 * bb, "batch_forward_ms": 1e3 * be,
        "batch_forward_ratio": be / bb,
        "gen_tokens_per_s_base": n_tok / gb, "gen_tokens_per_s": n_tok / ge,
        "gen_ratio": gb / ge,
    }


