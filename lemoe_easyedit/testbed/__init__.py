"""The embedded testbed: a small real LLaMA that knows the facts of a synthetic world.

No 7B model runs on a CPU and no model hub is reachable from everywhere, so the package
ships its own: ``testbed_assets/tiny-llama-factworld`` holds a ~0.8M-parameter
``LlamaForCausalLM`` and its ``LlamaTokenizer``, pretrained from scratch on every fact of
the world of seed 0 in every template, until it gets them right (``build_info.json``
records the accuracy per template). Reliability / Generality / Locality then mean something
on any machine in minutes::

    from lemoe_easyedit.testbed import load_testbed, make_edit_set, to_requests
    model, tok, world = load_testbed()
    records = make_edit_set(world, 100, style="counterfact", model=model, tokenizer=tok)
    requests = to_requests(records)

The directory name contains ``llama``, so EasyEdit's ``BaseEditor`` loads
:func:`testbed_model_path` like any other LLaMA checkpoint. If the shipped assets are
missing, :func:`testbed_model_path` rebuilds them (a few minutes on a laptop CPU) into a
cache directory: ``$LEMOE_TESTBED_CACHE`` or ``~/.cache/lemoe_easyedit/testbed``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from .editsets import (EditCase, counterfact_records, editor_inputs, make_edit_cases,
                       make_edit_set, to_requests, zsre_records)
from .metrics import fact_accuracy, greedy_complete, score_pairs, template_accuracy
from .world import EDIT_TEMPLATES, REPHRASE_TEMPLATES, Fact, Relation, World

__all__ = [
    "ASSET_NAME",
    "shipped_model_path",
    "testbed_model_path",
    "load_testbed",
    "load_world",
    "testbed_edit_set",
    "load_edit_set",
    "is_available",
    "DEFAULT_EDIT_SET",
    "build_testbed",
    "World",
    "Fact",
    "Relation",
    "EDIT_TEMPLATES",
    "REPHRASE_TEMPLATES",
    "EditCase",
    "make_edit_cases",
    "make_edit_set",
    "zsre_records",
    "counterfact_records",
    "to_requests",
    "editor_inputs",
    "fact_accuracy",
    "template_accuracy",
    "score_pairs",
    "greedy_complete",
]

#: Directory name of the shipped model (contains ``llama`` for EasyEdit's ``BaseEditor``).
ASSET_NAME = "tiny-llama-factworld"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "build_info.json")


def shipped_model_path() -> Path:
    """Where the shipped testbed lives inside the installed package (may be incomplete)."""
    return Path(__file__).resolve().parent.parent / "testbed_assets" / ASSET_NAME


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED)


def _cache_root() -> Path:
    env = os.environ.get("LEMOE_TESTBED_CACHE")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "lemoe_easyedit" / "testbed"


def testbed_model_path(seed: int = 0, build_if_missing: bool = True,
                       cache_dir: Optional[os.PathLike] = None, progress: bool = True) -> Path:
    """Directory of the testbed model of ``seed`` (default: the shipped one).

    Seed 0 is shipped with the package. Other seeds, or seed 0 when the shipped assets are
    missing, are looked up in (and, with ``build_if_missing``, built into)
    ``cache_dir/seed<seed>/tiny-llama-factworld``.
    """
    if seed == 0 and _complete(shipped_model_path()):
        return shipped_model_path()
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    path = root / f"seed{seed}" / ASSET_NAME
    if _complete(path):
        return path
    if not build_if_missing:
        raise FileNotFoundError(f"no testbed model at {path} (and none shipped for seed {seed})")
    from .build import build_testbed

    build_testbed(path, seed=seed, progress=progress,
                  command=f"lemoe_easyedit.testbed.testbed_model_path(seed={seed})")
    return path


def load_world(path: Optional[os.PathLike] = None) -> World:
    """The world a testbed directory was built on (``world.json``, else regenerated)."""
    path = Path(path) if path is not None else testbed_model_path()
    info = json.loads((path / "build_info.json").read_text())
    if (path / "world.json").is_file():
        world = World.from_dict(json.loads((path / "world.json").read_text()))
    else:
        world = World.generate(**info["world"]["params"])
    expected = info["world"].get("fingerprint")
    if expected and world.fingerprint() != expected:
        raise RuntimeError(f"the world of {path} does not match its build_info.json")
    return world


def load_testbed(path: Optional[os.PathLike] = None, device: str = "cpu", seed: int = 0
                 ) -> Tuple[object, object, World]:
    """``(model, tokenizer, world)`` of the testbed at ``path`` (default: :func:`testbed_model_path`).

    The model is a float32 ``LlamaForCausalLM`` in eval mode; the tokenizer is loaded with
    ``LlamaTokenizer`` exactly as EasyEdit's ``BaseEditor`` does (but keeps its own
    ``<pad>`` token and right padding).
    """
    from transformers import LlamaForCausalLM, LlamaTokenizer

    path = Path(path) if path is not None else testbed_model_path(seed=seed)
    tok = LlamaTokenizer.from_pretrained(str(path))
    tok.padding_side = "right"
    model = LlamaForCausalLM.from_pretrained(str(path))
    model.to(device)
    model.eval()
    return model, tok, load_world(path)


def testbed_edit_set(n: int, style: str = "counterfact", seed: int = 0, **kwargs):
    """``n`` edit records over the shipped testbed, filtered with its model (see
    :func:`make_edit_set`)."""
    model, tok, world = load_testbed()
    return make_edit_set(world, n, style=style, seed=seed, model=model, tokenizer=tok, **kwargs)


#: Name of the edit set :func:`load_edit_set` gives by default.
DEFAULT_EDIT_SET = "counterfact-3000"
_SET_NAME = re.compile(r"^(counterfact|zsre)(?:-(\d+))?(?:-seed(\d+))?$")


def is_available() -> bool:
    """Whether the shipped testbed (model, tokenizer, build info) is present."""
    return _complete(shipped_model_path())


@functools.lru_cache(maxsize=8)
def _edit_requests(style: str, n: int, seed: int) -> Tuple[dict, ...]:
    return tuple(to_requests(testbed_edit_set(n, style=style, seed=seed)))


def load_edit_set(name: str = DEFAULT_EDIT_SET) -> List[dict]:
    """A named edit set over the shipped testbed, as EasyEdit request dicts.

    Names are ``<style>[-<n>][-seed<k>]``: ``style`` ``counterfact`` or ``zsre`` (same
    edits, the record format only matters before conversion), ``n`` edits (default 3000),
    seed ``k`` (default 0); e.g. ``"counterfact-3000"`` (the default), ``"zsre-500-seed1"``.
    Targets and locality prompts are checked against the shipped model (see
    :func:`make_edit_cases`). Cached per process; each call returns fresh copies.
    """
    m = _SET_NAME.match(name or DEFAULT_EDIT_SET)
    if m is None:
        raise ValueError(f"unknown testbed edit set {name!r}: expected "
                         "'<counterfact|zsre>[-<n>][-seed<k>]', e.g. 'counterfact-3000'")
    style, n, seed = m.group(1), int(m.group(2) or 3000), int(m.group(3) or 0)
    return copy.deepcopy(list(_edit_requests(style, n, seed)))


# Names start with "test": keep pytest from collecting them where they are imported.
testbed_model_path.__test__ = False  # type: ignore[attr-defined]
testbed_edit_set.__test__ = False  # type: ignore[attr-defined]


def build_testbed(*args, **kwargs):
    """See :func:`lemoe_easyedit.testbed.build.build_testbed`."""
    from .build import build_testbed as _build

    return _build(*args, **kwargs)
