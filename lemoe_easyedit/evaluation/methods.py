"""Which code runs a method, its hparams, and how the stream is cut into edit calls."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from .provenance import _easyeditor_version


def _alg_dict() -> Dict[str, Callable]:
    from easyeditor.util.alg_dict import ALG_DICT

    return ALG_DICT


def _ensure_method(method: str) -> None:
    """Import what registers ``method`` (LEMoE; the project's GRACE when EasyEdit lacks it)."""
    if method == "LEMoE":
        from .. import register

        register()
    elif method == "GRACE":
        from .. import grace  # noqa: F401  (registers GRACE only when EasyEdit has none)
    if method not in _alg_dict():
        raise ValueError(f"method {method!r} is not registered in EasyEdit's ALG_DICT; "
                         f"available: {', '.join(sorted(_alg_dict()))}")


def implementation_of(method: str) -> str:
    """Which code runs ``method``: the installed EasyEdit's, or this project's."""
    _ensure_method(method)
    fn = _alg_dict()[method]
    module = getattr(fn, "__module__", "") or ""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        module = getattr(inner, "__module__", module) or module
    ee = _easyeditor_version()
    if module.startswith("lemoe_easyedit"):
        return f"lemoe_easyedit ({module}.{getattr(fn, '__name__', '?')})"
    return f"easyeditor {ee} ({module}.{getattr(fn, '__name__', '?')})"


def _hparams_class(method: str):
    _ensure_method(method)
    if method == "LEMoE":
        from ..hparams import LEMoEHyperParams

        return LEMoEHyperParams
    import easyeditor

    names = {"GRACE": ["GraceHyperParams"], "FT": ["FTHyperParams"],
             "ROME": ["ROMEHyperParams"], "MEMIT": ["MEMITHyperParams"],
             "KN": ["KNHyperParams"], "LoRA": ["LoRAHyperParams"],
             "MEND": ["MENDHyperParams"], "SERAC": ["SERACHparams"],
             "IKE": ["IKEHyperParams"], "WISE": ["WISEHyperParams"],
             "MELO": ["MELOHyperParams"], "AlphaEdit": ["AlphaEditHyperParams"]}
    for name in names.get(method, []) + [f"{method}HyperParams"]:
        cls = getattr(easyeditor, name, None)
        if cls is not None:
            return cls
    if method == "GRACE":
        from ..grace import GraceHyperParams

        return GraceHyperParams
    raise ValueError(f"no hyper-parameter class found for method {method!r}")


def load_hparams(method: str, path: str, **overrides: Any):
    """Load ``path`` with the method's EasyEdit hparams class, then apply ``overrides``
    (None values are ignored). ``alg_name`` in the file must be ``method``."""
    import yaml

    cls = _hparams_class(method)
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of hparams")
    if config.get("alg_name") != method:
        raise ValueError(f"{path}: alg_name is {config.get('alg_name')!r}, not {method!r}")
    hparams = cls.from_hparams(str(path))
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(hparams, key):
            raise ValueError(f"{method} hparams have no field {key!r} to override")
        setattr(hparams, key, value)
    return hparams


def edit_mode(method: str, hparams) -> Tuple[str, int]:
    """``("batch", batch_size)`` for a batchable method with ``batch_size > 1``, else
    ``("sequential", 1)`` (see the module docstring)."""
    _ensure_method(method)
    size = getattr(hparams, "batch_size", 1)
    size = int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else 1
    try:
        from easyeditor.editors.batch_editor import BatchEditor

        batchable = bool(BatchEditor.is_batchable_method(method))
    except ImportError:  # pragma: no cover - every EasyEdit form has it
        batchable = False
    if batchable and size > 1:
        return "batch", size
    return "sequential", 1


def edit_calls(n: int, mode: str, batch_size: int,
               checkpoint_every: Optional[int] = None) -> List[Tuple[int, int]]:
    """``[(start, end), ...]``: the requests of each edit call over a chunk of ``n`` edits."""
    step = 1 if mode == "sequential" else max(1, batch_size)
    calls, start = [], 0
    while start < n:
        end = min(n, start + step)
        if checkpoint_every:
            next_cp = (start // checkpoint_every + 1) * checkpoint_every
            end = min(end, next_cp)
        calls.append((start, end))
        start = end
    return calls

