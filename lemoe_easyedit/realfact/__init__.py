"""The realfact model: a small LLaMA that knows the true facts of real benchmark records.

The shared CounterFact and zsRE files are EasyEdit's own benchmarks, but the testbed model
never saw their names and objects, so editing scores on them measure nothing. This model is
pretrained (from scratch, on this machine) on the true facts those records state: each
record's edit prompt, paraphrase and locality prompt with their true answers, ended by
``</s>`` (see :mod:`.build`). Before editing it answers them; after editing, Rel / Gen / Loc
on the real files then mean what they mean for a 7B model, at a size a CPU edits in minutes.

::

    from lemoe_easyedit.realfact import realfact_model_path, load_realfact
    path = realfact_model_path()          # shipped, else built into the cache (~20 min)
    model, tok = load_realfact()

The default model (:data:`ASSET_NAME`, 1.8M parameters, 7 MB) ships in
``lemoe_easyedit/realfact_assets/``. When it is missing, :func:`realfact_model_path` builds
it from the shared files (``../shared/data`` beside the repository, or ``$LEMOE_DATA_DIR``)
into ``$LEMOE_REALFACT_CACHE`` (default ``~/.cache/lemoe_easyedit/realfact``), with a
progress bar when stderr is a terminal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

from .knowledge import known_requests, knowledge_report, request_probes, score_answers
from .records import FactRecord, read_records

__all__ = ["ASSET_NAME", "shipped_model_path", "realfact_model_path", "load_realfact",
           "build_info", "default_data_dir", "is_available", "known_requests",
           "knowledge_report", "request_probes", "score_answers", "read_records",
           "FactRecord", "TRAINING_TEXT"]

#: Directory name of the default model (contains ``llama`` for EasyEdit's ``BaseEditor``).
ASSET_NAME = "tiny-llama-realfact"
#: The model's own training text, one fact a line (ROME/MEMIT statistics).
TRAINING_TEXT = "training_text.txt"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "build_info.json", TRAINING_TEXT)
_PACKAGE = Path(__file__).resolve().parent.parent


def shipped_model_path() -> Path:
    """Where the default model lives inside the installed package (may be incomplete)."""
    return _PACKAGE / "realfact_assets" / ASSET_NAME


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED)


def default_data_dir() -> Optional[Path]:
    """The shared benchmark files: ``$LEMOE_DATA_DIR``, else ``../shared/data`` beside the
    repository; None when neither exists."""
    env = os.environ.get("LEMOE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(_PACKAGE.parent.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _cache_root() -> Path:
    env = os.environ.get("LEMOE_REALFACT_CACHE")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "lemoe_easyedit" / "realfact"


def realfact_model_path(build_if_missing: bool = True, cache_dir: Optional[os.PathLike] = None,
                        data_dir: Optional[os.PathLike] = None,
                        progress: Optional[bool] = None) -> Path:
    """Directory of the default realfact model.

    The shipped copy when complete; else ``cache_dir/tiny-llama-realfact``, built there
    from the shared files (``data_dir``, default :func:`default_data_dir`) when missing and
    ``build_if_missing``. ``progress`` defaults to "stderr is a terminal".
    """
    if _complete(shipped_model_path()):
        return shipped_model_path()
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    path = root / ASSET_NAME
    if _complete(path):
        return path
    if not build_if_missing:
        raise FileNotFoundError(f"no realfact model shipped or at {path}")
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    if data is None:
        raise FileNotFoundError(
            "the realfact model is not shipped here and building it needs the benchmark "
            "files: set LEMOE_DATA_DIR to the folder holding counterfact/ and zsre/")
    from .build import build_realfact, default_sources

    records, background = default_sources(data)
    build_realfact(path, records, background, progress=progress,
                   command="lemoe_easyedit.realfact.realfact_model_path()")
    return path


def build_info(path: Optional[os.PathLike] = None) -> dict:
    """The ``build_info.json`` of a realfact model directory (default: the default model)."""
    path = Path(path) if path is not None else realfact_model_path()
    return json.loads((path / "build_info.json").read_text())


def is_available() -> bool:
    """Whether the default model ships with this installation."""
    return _complete(shipped_model_path())


def load_realfact(path: Optional[os.PathLike] = None, device: str = "cpu") -> Tuple[object, object]:
    """``(model, tokenizer)`` of a realfact directory (default :func:`realfact_model_path`),
    loaded as EasyEdit's ``BaseEditor`` loads a LLaMA path (``LlamaTokenizer``), right
    padding, model in eval mode."""
    from transformers import LlamaForCausalLM, LlamaTokenizer

    path = Path(path) if path is not None else realfact_model_path()
    tok = LlamaTokenizer.from_pretrained(str(path))
    tok.padding_side = "right"
    model = LlamaForCausalLM.from_pretrained(str(path))
    model.to(device)
    model.eval()
    return model, tok


