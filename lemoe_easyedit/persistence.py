"""Edits that last: save, load, roll back and remove LEMoE edits of a deployed model.

A save is a directory with two files:

* ``adaptor.safetensors``: every expert slot's tensors, named ``slots.<i>.<name>`` (the
  expert's weights, the routing projection and key, the anchors and the ``enabled`` flag);
* ``manifest.json``: the format and its version, the identity of the base model the edits
  belong to (model type, class, layer count, hidden size, vocabulary size, a SHA-256 of the
  host FFN's weights and of the input embeddings, which the routing queries are built
  from), the adaptor's layer index and hparams, per slot its frozen flag, the edits it holds
  (with their ``edit_id``) and the name, dtype and shape of each of its tensors, the edit
  history and order plans, and the size and SHA-256 of the tensor file.

:func:`load_edits` reads only JSON and safetensors (no pickle, no ``torch.load``), checks
everything before it touches the model, and reproduces the saved model's logits exactly. A
refused load raises :class:`EditsFileError` saying which file and which field, and leaves the
model as it was. It needs no EasyEdit: the layer's configuration is rebuilt from the
manifest (as a :class:`StoredHyperParams` when EasyEdit is not importable).

:func:`save_edits` is atomic: the new save is written completely into a temporary directory
next to the target, its files and the directory are fsynced, and only then does it replace
the old save (an atomic exchange of the two directories where the OS offers one, else two
renames, a window that :func:`load_edits` recovers from). A process killed at any point of
a save leaves the previous save loadable and intact.

:func:`rollback`, :func:`find_edit` and :func:`remove_edit` undo edits expert by expert or
edit by edit; see their docstrings for exactly what is restored.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .injection import find_adaptor
from .layer import LEMoELayer
from .model_families import (family_of, get_submodule, materialised, mlp_path, num_layers,
                             proj_weight)
from .routing import QUERY_POOLS, ROUTERS, SUBJECT_BUFFERS, QueryBuilder
from .locality import subject_ids
from .training import encode_edits, negative_pool, train_slot

FORMAT = "lemoe-edits"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adaptor.safetensors"
_OWN_FILES = {MANIFEST, TENSORS}

#: Test hook: ``"<stage>:<marker path>"`` makes a save stop at ``stage`` (``tensors``: the
#: tensor file written; ``written``: the new save complete, not yet committed; ``aside``:
#: between the two renames of the fallback commit), create the marker file and sleep, so a
#: test can kill the process there.
SAVE_HOOK_ENV = "LEMOE_EDITS_SAVE_HOOK"

PathLike = Union[str, os.PathLike]

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

# hparams fields the layer and training read, with what each must be (manifest checks).
_CHOICES = {"expert_form": ("ffn", "lora"), "expert_init": ("copy", "random"),
            "router": ROUTERS, "query_pool": QUERY_POOLS,
            "key_init": ("random", "centroid")}
_POSITIVE_INTS = ("lora_rank", "router_dim", "top_k", "max_length", "max_steps",
                  "train_batch_size")
_NON_NEGATIVE_INTS = ("layer", "route_steps")
_NUMBERS = ("expert_scale", "guard_threshold", "lr", "route_lr", "weight_decay",
            "loss_threshold", "route_loss_weight")
#: hparams fields added after saves were first written, with the value that serves an older
#: save as it was saved.
_ADDED_FIELDS = {"guard_carries": False, "prompt_variants": 0, "prompt_dropout": 0.5}


class EditsFileError(ValueError):
    """A save of LEMoE edits cannot be loaded: missing, truncated or corrupted file, wrong
    format version, a manifest that disagrees with the tensors, or a base model other than
    the one the edits were made on. The message names the file and the field."""


@dataclass(frozen=True)
class EditLocation:
    """Where an edit lives: the index of the expert slot holding it and its record."""

    slot: int
    edit_id: Optional[int]
    prompt: str
    target_new: str
    frozen: bool
    record: Dict[str, Any]


class StoredHyperParams(types.SimpleNamespace):
    """The hparams of a loaded save when EasyEdit (and so ``LEMoEHyperParams``) is not
    importable: the manifest's fields as attributes, read duck-typed by the layer and by
    training."""

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(dict(vars(self)))


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------

def save_edits(model: nn.Module, directory: PathLike) -> Path:
    """Write the model's LEMoE adaptor to ``directory`` (created or atomically replaced).

    ``directory`` must not exist, be empty, or hold a previous save (only ``manifest.json``
    and ``adaptor.safetensors``); anything else is refused with FileExistsError rather than
    overwritten. Returns the directory. Raises ValueError if the model has no adaptor.
    """
    layer = find_adaptor(model)
    if layer is None:
        raise ValueError("this model has no LEMoE adaptor: there are no edits to save")
    target = Path(directory).absolute()
    _check_target(target)
    tensors, slots = _collect_slots(layer)
    manifest = _build_manifest(model, layer, slots)

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(target)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        tensor_path = tmp / TENSORS
        save_file(tensors, str(tensor_path), metadata={"format": FORMAT,
                                                       "format_version": str(FORMAT_VERSION)})
        _fsync_file(tensor_path)
        _hook("tensors")
        manifest["tensors"] = {"file": TENSORS, "bytes": tensor_path.stat().st_size,
                               "sha256": file_sha256(tensor_path)}
        text = json.dumps(_jsonable(manifest), indent=1, allow_nan=False, sort_keys=False)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _hook("written")
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_target(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target}: exists and is not a directory; refusing to replace it")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise FileExistsError(
                f"{target}: holds files that are not a LEMoE edits save ({', '.join(foreign)}); "
                f"refusing to replace it. Save into a new or empty directory.")


def _collect_slots(layer: LEMoELayer) -> Tuple[Dict[str, torch.Tensor], List[Dict]]:
    tensors: Dict[str, torch.Tensor] = {}
    slots = []
    for i, slot in enumerate(layer.slots):
        info = {}
        for name, t in slot.state_dict().items():
            t = t.detach()
            if t.dtype not in _DTYPES:
                raise ValueError(f"slot {i} tensor {name!r}: dtype {t.dtype} cannot be saved")
            tensors[f"slots.{i}.{name}"] = t.to("cpu").contiguous()
            info[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape)}
        slots.append({"frozen": bool(slot.frozen), "enabled": slot.is_enabled,
                      "edits": [dict(e) for e in slot.edits], "tensors": info})
    return tensors, slots


def _build_manifest(model: nn.Module, layer: LEMoELayer, slots: List[Dict]) -> Dict:
    hp = layer.hparams
    hp_dict = hp.to_dict() if hasattr(hp, "to_dict") else dict(vars(hp))
    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": _identity(model, layer.base_layer, layer.hidden),
        "layer": int(layer.layer_index),
        "module_path": layer.module_path,
        "hparams": hp_dict,
        "edit_counter": int(getattr(layer, "edit_counter", sum(len(s["edits"]) for s in slots))),
        "slots": slots,
        "history": getattr(layer, "history", []),
        "plans": getattr(layer, "plans", []),
    }


def _identity(model: nn.Module, host: nn.Module, hidden: int) -> Dict[str, Any]:
    embed = model.get_input_embeddings()
    with materialised(host), materialised(embed):
        host_items = list(host.state_dict().items())
        embed_items = [("weight", embed.weight)]
        return {
            "model_type": getattr(model.config, "model_type", None),
            "architecture": type(model).__name__,
            "num_layers": num_layers(model),
            "hidden_size": int(hidden),
            "vocab_size": int(embed.weight.shape[0]),
            # Exact checksums, in the dtype the model had when saved ...
            "dtype": str(embed.weight.dtype).replace("torch.", ""),
            "host_ffn_sha256": _tensors_sha256(host_items),
            "input_embeddings_sha256": _tensors_sha256(embed_items),
            # ... and values that identify the same weights in any dtype and on any device.
            "fingerprint": {"host_ffn": _fingerprint(host_items),
                            "input_embeddings": _fingerprint(embed_items)},
        }


#: Values of each weight tensor recorded in the fingerprint.
_FINGERPRINT_SAMPLES = 512
#: Two fingerprints match when every sampled value agrees within this relative difference
#: (16-bit types round to 2**-9 (bf16) or 2**-12 (fp16) of a value)...
_FINGERPRINT_RTOL = 2.0 ** -7
#: ... or this absolute one (fp16 flushes values below ~6e-8).
_FINGERPRINT_ATOL = 1e-6


def _fingerprint(named: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, Any]:
    """Shape and ``_FINGERPRINT_SAMPLES`` values at fixed positions of each tensor: the same
    for the same weights in any dtype or on any device (up to rounding), while another
    model's weights differ at nearly every position."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach()
        n = t.numel()
        if not n or not t.is_floating_point():
            out[name] = {"shape": list(t.shape), "values": []}
            continue
        index = torch.randint(n, (min(n, _FINGERPRINT_SAMPLES),), generator=gen)
        values = t.reshape(-1)[index.to(t.device)].to("cpu", torch.float64)
        out[name] = {"shape": list(t.shape), "values": values.tolist()}
    return out


def _same_fingerprint(saved: Dict[str, Any], have: Dict[str, Any]) -> Optional[str]:
    """None when two fingerprints match, else what differs."""
    if sorted(saved) != sorted(have):
        return f"tensors {sorted(saved)} against {sorted(have)}"
    for name, rec in saved.items():
        other = have[name]
        if rec.get("shape") != other["shape"]:
            return f"{name!r} has shape {rec.get('shape')} against {other['shape']}"
        a = torch.tensor(rec.get("values", []), dtype=torch.float64)
        b = torch.tensor(other["values"], dtype=torch.float64)
        if a.shape != b.shape or not bool(
                ((a - b).abs() <= _FINGERPRINT_RTOL * a.abs() + _FINGERPRINT_ATOL).all()):
            return f"{name!r} has other values"
    return None


def _tensors_sha256(named: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of tensors (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks (saves, data files, build inputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: tuples to lists, numpy scalars to numbers, non-finite floats to
    strings, anything else unknown to its ``str``."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and tuple(getattr(obj, "shape", (1,))) == ():
        return _jsonable(obj.item())  # numpy / torch scalars
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)


def _hook(stage: str) -> None:
    spec = os.environ.get(SAVE_HOOK_ENV)
    if not spec or not spec.startswith(stage + ":"):
        return
    Path(spec.split(":", 1)[1]).write_text(str(os.getpid()))
    while True:  # wait here until the test kills this process
        time.sleep(60)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the OS or file system cannot."""
    if not sys.platform.startswith("linux") or os.environ.get("LEMOE_EDITS_NO_EXCHANGE"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _commit(tmp: Path, target: Path) -> None:
    """Make the complete save in ``tmp`` the one at ``target``; the old one is deleted only
    after the new one is in place."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(parent)
        _remove_asides(target)
        return
    if _exchange(tmp, target):
        old = tmp
    else:
        old = parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        _hook("aside")
        os.rename(tmp, target)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    _remove_asides(target)


def _asides(target: Path) -> List[Path]:
    """Previous saves moved aside by an interrupted fallback commit, newest first."""
    found = [p for p in target.parent.glob(f".{target.name}.old-*")
             if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _remove_asides(target: Path) -> None:
    for p in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _remove_stale_siblings(target: Path) -> None:
    """Delete temporary directories left by saves whose process is gone."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid):  # a save in progress (this process's own are cleaned by it)
            continue
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------

def load_edits(model: nn.Module, directory: PathLike, *, replace: bool = False) -> nn.Module:
    """Attach the edits saved in ``directory`` to ``model`` (the base model they were made
    on, freshly loaded, in any dtype and on any device or device map) and return ``model``.

    PEFT's convention (``model = PeftModel.from_pretrained(model, dir)``):
    ``model = load_edits(model, dir)``. The model is edited in place, so the returned object
    is the one passed in; the adaptor layer is ``find_adaptor(model)``.

    Everything is checked before the model changes: the files exist, have the recorded size
    and SHA-256, the format version is known, the manifest agrees with the tensors (same
    names, dtypes and shapes, shapes that fit this model) and the model is the same base
    model (type, class, layers, hidden size, vocabulary, host FFN and embedding checksums).
    Any failure raises :class:`EditsFileError` naming the file and field, and the model is
    left untouched. A model that already has an adaptor is refused (ValueError) unless
    ``replace``, in which case the old adaptor is swapped out only once the new one is
    built. The open online expert, if the save had one, stays open.
    """
    source = _save_dir(Path(directory))
    manifest_path = source / MANIFEST
    manifest = _read_manifest(manifest_path)
    where = str(manifest_path)
    hp = _hparams_from(manifest["hparams"], where)
    if hp.layer != manifest["layer"]:
        raise EditsFileError(f"{where}: field 'hparams.layer' ({hp.layer}) disagrees with "
                             f"field 'layer' ({manifest['layer']})")
    existing = find_adaptor(model)
    if existing is not None and not replace:
        raise ValueError("this model already has a LEMoE adaptor; load edits into a freshly "
                         "loaded base model, or pass replace=True to swap it out")
    host, path = _check_identity(model, manifest, where)
    tensors = _read_tensors(source, manifest)
    layer = _build_layer(model, host, path, hp, manifest, tensors, source)
    if existing is not None:
        _detach(model, existing)
    _attach(model, layer, path)
    return model


def _save_dir(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    asides = _asides(directory.absolute()) if directory.parent.is_dir() else []
    if asides:
        warnings.warn(f"{directory} is missing: a save into it was interrupted while "
                      f"replacing the previous one; loading that previous save from "
                      f"{asides[0]}", RuntimeWarning, stacklevel=3)
        return asides[0]
    raise EditsFileError(f"{directory}: no such directory (no LEMoE edits saved there)")


def _read_manifest(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise EditsFileError(f"{path}: missing (the save is incomplete or this is not a "
                             f"LEMoE edits directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EditsFileError(f"{path}: not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(manifest, dict):
        raise EditsFileError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise EditsFileError(f"{path}: field 'format' is {manifest.get('format')!r}, expected "
                             f"{FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EditsFileError(f"{path}: field 'format_version' is {version!r}; this version of "
                             f"lemoe_easyedit reads format version {FORMAT_VERSION} only")
    _check_schema(manifest, str(path))
    return manifest


def _need(ok: bool, where: str, field: str, why: str) -> None:
    if not ok:
        raise EditsFileError(f"{where}: field {field!r} {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_schema(m: Dict[str, Any], where: str) -> None:
    for key, kind in (("base_model", dict), ("hparams", dict), ("slots", list),
                      ("tensors", dict), ("history", list), ("plans", list)):
        _need(isinstance(m.get(key), kind), where, key, f"must be a JSON {kind.__name__}")
    _need(_is_int(m.get("layer")) and m["layer"] >= 0, where, "layer",
          "must be a non-negative integer")
    _need(isinstance(m.get("module_path"), str), where, "module_path", "must be a string")
    _need(_is_int(m.get("edit_counter")) and m["edit_counter"] >= 0, where, "edit_counter",
          "must be a non-negative integer")
    base = m["base_model"]
    for key in ("model_type", "architecture", "host_ffn_sha256", "input_embeddings_sha256"):
        _need(isinstance(base.get(key), str), where, f"base_model.{key}", "must be a string")
    for key in ("num_layers", "hidden_size", "vocab_size"):
        _need(_is_int(base.get(key)), where, f"base_model.{key}", "must be an integer")
    t = m["tensors"]
    _need(t.get("file") == TENSORS, where, "tensors.file", f"must be {TENSORS!r}")
    _need(_is_int(t.get("bytes")) and t["bytes"] > 0, where, "tensors.bytes",
          "must be a positive integer")
    _need(isinstance(t.get("sha256"), str) and len(t["sha256"]) == 64, where, "tensors.sha256",
          "must be a hex SHA-256")
    n = len(m["slots"])
    for i, s in enumerate(m["slots"]):
        f = f"slots[{i}]"
        _need(isinstance(s, dict), where, f, "must be a JSON object")
        _need(isinstance(s.get("frozen"), bool), where, f"{f}.frozen", "must be true or false")
        _need(s["frozen"] or i == n - 1, where, f"{f}.frozen",
              "is false, but only the newest expert can be open")
        _need(isinstance(s.get("edits"), list) and all(
            isinstance(e, dict) and isinstance(e.get("prompt"), str)
            and isinstance(e.get("target_new"), str) for e in s["edits"]),
            where, f"{f}.edits", "must be a list of edit records with 'prompt' and 'target_new'")
        _need(isinstance(s.get("tensors"), dict) and all(
            isinstance(v, dict) and v.get("dtype") in _DTYPES.values()
            and isinstance(v.get("shape"), list) and all(_is_int(d) and d >= 0
                                                         for d in v["shape"])
            for v in s["tensors"].values()),
            where, f"{f}.tensors", "must map tensor names to {dtype, shape}")


def _hparams_from(d: Dict[str, Any], where: str):
    """``LEMoEHyperParams`` when EasyEdit is importable, else :class:`StoredHyperParams`;
    the fields the layer and training read are checked either way."""
    for key, choices in _CHOICES.items():
        _need(d.get(key) in choices, where, f"hparams.{key}", f"must be one of {choices}")
    for key in _POSITIVE_INTS:
        _need(_is_int(d.get(key)) and d[key] >= 1, where, f"hparams.{key}",
              "must be an integer >= 1")
    for key in _NON_NEGATIVE_INTS:
        _need(_is_int(d.get(key)) and d[key] >= 0, where, f"hparams.{key}",
              "must be an integer >= 0")
    for key in _NUMBERS:
        v = d.get(key)
        _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              where, f"hparams.{key}", "must be a finite number")
    d = {**_ADDED_FIELDS, **d}
    for key in ("locality_guard", "guard_carries"):
        _need(isinstance(d.get(key), bool), where, f"hparams.{key}", "must be true or false")
    _need(_is_int(d.get("seed")), where, "hparams.seed", "must be an integer")
    w = d.get("expert_width")
    _need(w is None or (_is_int(w) and w >= 1), where, "hparams.expert_width",
          "must be null or an integer >= 1")
    try:
        from .hparams import LEMoEHyperParams
    except ImportError:
        return StoredHyperParams(**d)
    try:
        return LEMoEHyperParams.from_dict(d, source=f"{where}: field 'hparams'")
    except (TypeError, ValueError) as exc:
        raise EditsFileError(f"{where}: field 'hparams': {exc}") from exc


def _check_identity(model: nn.Module, m: Dict[str, Any], where: str) -> Tuple[nn.Module, str]:
    saved = m["base_model"]

    def differ(field: str, have: Any) -> None:
        if saved[field] != have:
            raise EditsFileError(
                f"{where}: field 'base_model.{field}' is {saved[field]!r} but this model's is "
                f"{have!r}: the edits were made on a different base model")

    try:
        fam = family_of(model)
    except ValueError as exc:
        raise EditsFileError(f"{where}: cannot attach edits to this model: {exc}") from exc
    differ("model_type", getattr(model.config, "model_type", None))
    differ("architecture", type(model).__name__)
    differ("num_layers", num_layers(model))
    path = mlp_path(model, m["layer"])
    if path != m["module_path"]:
        raise EditsFileError(f"{where}: field 'module_path' is {m['module_path']!r} but layer "
                             f"{m['layer']}'s FFN is at {path!r} in this model")
    host = get_submodule(model, path)
    if isinstance(host, LEMoELayer):
        host = host.base_layer
    embed = model.get_input_embeddings()
    with materialised(host), materialised(embed):
        differ("hidden_size", int(proj_weight(getattr(host, fam.in_projs[0]), fam).shape[1]))
        differ("vocab_size", int(embed.weight.shape[0]))
        named = {"host_ffn": list(host.state_dict().items()),
                 "input_embeddings": [("weight", embed.weight)]}
        _check_weights(saved, named, m, where)
    return host, path


def _check_weights(saved: Dict[str, Any], named: Dict[str, list], m: Dict[str, Any],
                   where: str) -> None:
    """The host FFN's and the embeddings' weights are the saved base model's.

    Exact (SHA-256) when this model has the dtype it was saved from; otherwise the
    fingerprint (sampled values, any dtype or device). A save written before fingerprints
    existed is checked exactly, in this model's dtype or cast to the dtype it was saved
    from (the dtype of its experts): a float32 model loads the edits of its bf16 copy, not
    the reverse (float32 checksums cannot be recomputed from bf16 weights).
    """
    shas = {k: _tensors_sha256(v) for k, v in named.items()}
    if all(saved[f"{k}_sha256"] == sha for k, sha in shas.items()):
        return
    fingerprint = saved.get("fingerprint")
    if isinstance(fingerprint, dict):
        have_dtype = str(named["input_embeddings"][0][1].dtype).replace("torch.", "")
        if saved.get("dtype") != have_dtype:
            for k, v in named.items():
                why = _same_fingerprint(fingerprint.get(k, {}), _fingerprint(v))
                if why is not None:
                    raise EditsFileError(
                        f"{where}: field 'base_model.fingerprint.{k}' does not match this "
                        f"model ({why}): the edits were made on a different base model")
            return
    else:
        old = _saved_expert_dtype(m)
        if old is not None and all(
                saved[f"{k}_sha256"] == _tensors_sha256([(n, t.to(old)) for n, t in v])
                for k, v in named.items()):
            return
    k = next(k for k, sha in shas.items() if saved[f"{k}_sha256"] != sha)
    hint = "" if isinstance(fingerprint, dict) else (
        " (a save from before dtype-independent checks: load the base model in the dtype "
        "the edits were saved from)")
    raise EditsFileError(
        f"{where}: field 'base_model.{k}_sha256' is {saved[f'{k}_sha256']!r} but this "
        f"model's is {shas[k]!r}: the edits were made on a different base model{hint}")


def _saved_expert_dtype(m: Dict[str, Any]) -> Optional[torch.dtype]:
    """The dtype a save's experts were stored in (its host model's, before format
    changes), or None."""
    names = {v: k for k, v in _DTYPES.items()}
    for s in m["slots"]:
        for name, info in s["tensors"].items():
            if name.startswith("expert."):
                return names.get(info["dtype"])
    return None


def _read_tensors(source: Path, m: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    path = source / TENSORS
    where = str(path)
    if not path.is_file():
        raise EditsFileError(f"{where}: missing (the manifest refers to it)")
    size = path.stat().st_size
    if size != m["tensors"]["bytes"]:
        raise EditsFileError(f"{where}: {size} bytes, but the manifest's field 'tensors.bytes' "
                             f"says {m['tensors']['bytes']}: the file is truncated or replaced")
    expected = {f"slots.{i}.{name}": info for i, s in enumerate(m["slots"])
                for name, info in s["tensors"].items()}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            have = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()))
                    for k in f.keys()}
            _compare_keys(where, expected, have)
            if file_sha256(path) != m["tensors"]["sha256"]:
                raise EditsFileError(f"{where}: SHA-256 differs from the manifest's field "
                                     f"'tensors.sha256': the file is corrupted")
            return {k: f.get_tensor(k) for k in expected}
    except EditsFileError:
        raise
    except Exception as exc:  # safetensors reports a malformed header in several ways
        raise EditsFileError(f"{where}: not a readable safetensors file: "
                             f"{type(exc).__name__}: {exc}") from exc


def _compare_keys(where: str, expected: Dict[str, Dict], have: Dict[str, Tuple]) -> None:
    missing = sorted(set(expected) - set(have))
    if missing:
        raise EditsFileError(f"{where}: tensor(s) listed in the manifest are missing from the "
                             f"file: {', '.join(missing[:5])}")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise EditsFileError(f"{where}: tensor(s) in the file are not in the manifest: "
                             f"{', '.join(extra[:5])}")
    for key, info in expected.items():
        dtype, shape = have[key]
        if dtype != info["dtype"] or shape != info["shape"]:
            raise EditsFileError(
                f"{where}: tensor {key!r} is {dtype}{shape} in the file but "
                f"{info['dtype']}{info['shape']} in the manifest")


def _build_layer(model: nn.Module, host: nn.Module, path: str, hp, m: Dict[str, Any],
                 tensors: Dict[str, torch.Tensor], source: Path) -> LEMoELayer:
    """A detached LEMoE layer holding the saved slots; the model is not touched."""
    fam = family_of(model)
    hidden = int(proj_weight(getattr(host, fam.in_projs[0]), fam).shape[1])
    layer = LEMoELayer(host, fam, hp, QueryBuilder.for_model(model, hp), hidden)
    where = str(source / TENSORS)
    for i, info in enumerate(m["slots"]):
        slot = layer.new_slot(seed=0)  # own generator: the caller's random state untouched
        own = slot.state_dict()
        names = set(info["tensors"])
        if "radius" not in names:  # saved before anchors had radii: the guard alone decides
            own.pop("radius")
        for name in SUBJECT_BUFFERS:
            if name not in names:  # saved before the subject router existed
                own.pop(name)
        if names != set(own):
            lack, extra = sorted(set(own) - names), sorted(names - set(own))
            raise EditsFileError(
                f"{where}: slot {i} does not fit this model's {hp.expert_form} expert "
                f"(missing: {lack or 'none'}; unexpected: {extra or 'none'})")
        with torch.no_grad():
            for name, target in own.items():
                t = tensors[f"slots.{i}.{name}"]
                # Floating tensors are cast to what this model stores them in: edits saved
                # from a float32 model load into its bf16 copy and the reverse (the
                # experts take the host's dtype, routing state stays float32).
                if name == "anchors":
                    if t.dim() != 2 or t.shape[1] != hidden or not t.is_floating_point():
                        raise EditsFileError(f"{where}: slot {i} anchors are "
                                             f"{t.dtype}{list(t.shape)}, expected "
                                             f"floating [n, {hidden}]")
                    slot.anchors = t.to(target.device, target.dtype)
                    continue
                if name == "radius":
                    n = len(tensors[f"slots.{i}.anchors"])
                    if t.dim() != 1 or len(t) not in (0, n) or not t.is_floating_point():
                        raise EditsFileError(f"{where}: slot {i} radius is "
                                             f"{t.dtype}{list(t.shape)}, expected "
                                             f"floating [{n}] (one per anchor)")
                    slot.radius = t.to(target.device, target.dtype)
                    continue
                if name in SUBJECT_BUFFERS:  # their lengths vary with the slot's edits
                    if t.dim() != target.dim() or t.dtype != torch.long:
                        raise EditsFileError(f"{where}: slot {i} {name} are "
                                             f"{t.dtype}{list(t.shape)}, expected int64 "
                                             f"with {target.dim()} dimensions")
                    n = len(tensors[f"slots.{i}.anchors"])
                    if name == "anchor_subjects" and len(t) not in (0, n):
                        raise EditsFileError(f"{where}: slot {i} has {len(t)} anchor_subjects "
                                             f"for {n} anchors")
                    setattr(slot, name, t.to(target.device))
                    continue
                if t.shape != target.shape or t.is_floating_point() != \
                        target.is_floating_point():
                    raise EditsFileError(f"{where}: slot {i} tensor {name!r} is "
                                         f"{t.dtype}{list(t.shape)}, this model needs "
                                         f"{target.dtype}{list(target.shape)}")
                target.copy_(t.to(target.dtype))
        if info["frozen"]:
            slot.freeze()
        else:
            slot.unfreeze()
        slot.edits = [dict(e) for e in info["edits"]]
    layer.layer_index = m["layer"]
    layer.module_path = path
    layer.edit_counter = m["edit_counter"]
    layer.history = list(m["history"])
    layer.plans = list(m["plans"])
    return layer


def _attach(model: nn.Module, layer: LEMoELayer, path: str) -> None:
    parent_path, name = path.rsplit(".", 1)
    setattr(get_submodule(model, parent_path), name, layer)
    layer.hook_handle = model.register_forward_pre_hook(layer.queries, with_kwargs=True)


def _detach(model: nn.Module, layer: LEMoELayer) -> None:
    layer.hook_handle.remove()
    parent_path, name = layer.module_path.rsplit(".", 1)
    setattr(get_submodule(model, parent_path), name, layer.base_layer)


# ----------------------------------------------------------------------------------------
# Rollback, find, remove
# ----------------------------------------------------------------------------------------

def _layer_of(model: nn.Module) -> LEMoELayer:
    layer = find_adaptor(model)
    if layer is None:
        raise ValueError("this model has no LEMoE adaptor: it holds no edits")
    return layer


def rollback(model: nn.Module, batch: Union[int, Sequence[int], None] = None,
             last: Optional[int] = None) -> List[Dict[str, Any]]:
    """Remove whole experts: slot ``batch`` (an index, negative counts from the end, or a
    list of indices) or the ``last`` k; returns the edit records they held.

    What is restored, exactly (``torch.equal`` logits):

    * removing the newest experts (``last=k``, or ``batch`` the last index) gives the model
      as it was before those experts were created, with either router and any ``top_k``;
    * removing a middle expert keeps, bit for bit, the output of every input none of whose
      positions was routed to it with ``top_k=1`` (the remaining experts' routes, scores and
      anchors do not change). Inputs that were routed to it go to the best remaining expert
      or, with the locality guard, to none. That is the model without that batch only as far
      as later experts did not depend on it: they were trained while it existed (with the
      learned router, against its anchors), so they are not retrained. With ``top_k > 1``
      and the anchor router, gates can move by ~1e-6 (tie-break offsets follow indices).
    """
    layer = _layer_of(model)
    n = len(layer.slots)
    if (batch is None) == (last is None):
        raise ValueError("rollback needs exactly one of batch= (slot index or indices) and "
                         "last= (number of newest experts)")
    if last is not None:
        if not _is_int(last) or not 1 <= last <= n:
            raise ValueError(f"last must be an integer in [1, {n}] (the model has {n} "
                             f"experts), got {last!r}")
        indices = list(range(n - last, n))
    else:
        raw = [batch] if _is_int(batch) else batch
        if not isinstance(raw, (list, tuple)) or not raw or not all(_is_int(i) for i in raw):
            raise TypeError(f"batch must be a slot index or a list of slot indices, got "
                            f"{batch!r}")
        bad = [i for i in raw if not -n <= i < n]
        if bad:
            raise ValueError(f"batch index {bad[0]} out of range: the model has {n} experts")
        indices = sorted({i % n for i in raw})
    removed = []
    for i in reversed(indices):
        removed = [dict(e, slot=i) for e in layer.slots[i].edits] + removed
        layer.remove_slot(i)
    layer.history = getattr(layer, "history", []) + [
        {"mode": "rollback", "slots": indices,
         "edit_ids": [e.get("edit_id") for e in removed]}]
    return removed


def _matches(record: Dict[str, Any], key: Union[int, str]) -> bool:
    if isinstance(key, str):
        return record.get("prompt") == key
    return record.get("edit_id") == key


def _check_key(key: Any) -> None:
    if not (_is_int(key) or isinstance(key, str)):
        raise TypeError(f"an edit is named by its edit_id (int) or its prompt (str), got "
                        f"{type(key).__name__}")


def find_edit(model: nn.Module, key: Union[int, str]) -> Optional[EditLocation]:
    """Which expert holds an edit, by ``edit_id`` (int) or prompt (str); None if no expert
    does. For a prompt edited more than once, the newest edit (the one the model produces)."""
    _check_key(key)
    layer = _layer_of(model)
    for i in reversed(range(len(layer.slots))):
        slot = layer.slots[i]
        for record in reversed(slot.edits):
            if _matches(record, key):
                return EditLocation(i, record.get("edit_id"), record["prompt"],
                                    record["target_new"], bool(slot.frozen), dict(record))
    return None


def remove_edit(model: nn.Module, tok, key: Union[int, str], hparams=None
                ) -> List[Dict[str, Any]]:
    """Remove edits held inside experts: the edit with ``edit_id`` ``key`` (int), or every
    edit of prompt ``key`` (str). Returns the removed records.

    Each expert that held one is replaced by a freshly initialised expert at the same index,
    trained (``training.train_slot``, same seed as a new expert at that index) on its
    remaining edits only; an expert left with no edits is removed (see :func:`rollback`).
    The other experts are not touched, so their routes and outputs stay as they were. The
    training settings are ``hparams`` or else the adaptor's. If training fails (diverges,
    interrupted), every replaced expert is put back and the error re-raised. KeyError if no
    expert holds such an edit.
    """
    _check_key(key)
    layer = _layer_of(model)
    hp = hparams if hparams is not None else layer.hparams
    hits = [i for i, s in enumerate(layer.slots) if any(_matches(e, key) for e in s.edits)]
    if not hits:
        what = "prompt" if isinstance(key, str) else "edit_id"
        raise KeyError(f"no expert holds an edit with {what} {key!r}")
    removed: List[Dict[str, Any]] = []
    plans = []
    for i in hits:
        slot = layer.slots[i]
        gone = [e for e in slot.edits if _matches(e, key)]
        keep = [e for e in slot.edits if not _matches(e, key)]
        removed += [dict(e, slot=i) for e in gone]
        plans.append((i, keep, encode_edits(tok, keep, hp.max_length) if keep else None))
    replaced: List[Tuple[int, nn.Module]] = []
    try:
        for i, keep, encoded in plans:
            if not keep:
                continue
            old = layer.slots[i]
            fresh = layer.new_slot(seed=hp.seed + i)
            del layer.slots[len(layer.slots) - 1]
            layer.slots[i] = fresh
            replaced.append((i, old))
            fresh.edits = [dict(e) for e in keep]
            subjects: Dict[str, int] = {}
            negatives = negative_pool(model, layer, tok, keep, subjects, hp,
                                      fresh.routing.key.device)
            about = [e.get("subject") for e in keep]
            train_slot(model, layer, i, encoded, tok, hp, progress=False, negatives=negatives,
                       edit_subjects=subject_ids(about, subjects))
            if old.frozen:
                fresh.freeze()
            else:
                fresh.unfreeze()
    except BaseException:
        for i, old in reversed(replaced):
            layer.slots[i] = old
        layer.forced_routes = None
        raise
    for i, keep, _ in reversed(plans):
        if not keep:
            layer.remove_slot(i)
    layer.history = getattr(layer, "history", []) + [
        {"mode": "remove_edit", "slots": hits, "edit_ids": [e.get("edit_id") for e in removed]}]
    return removed
