"""``GraceHyperParams``: the same YAML keys as upstream EasyEdit's GRACE.

A ``hparams/GRACE/*.yaml`` file therefore loads with this class and, unchanged, with
upstream EasyEdit's ``GraceHyperParams`` (whose constructor rejects unknown keys), so the
same file runs whichever GRACE implementation is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Union

import yaml

from ..easyedit import load_easyeditor
from ..hparams_files import find_hparams_file, resolve_relative

load_easyeditor()
from easyeditor.util.hparams import HyperParams  # noqa: E402

DIST_FNS = ("euc",)
VAL_INITS = ("cold", "warm")
VAL_TRAINS = ("sgd",)
REPLACEMENTS = ("replace_last", "replace_all")
EPS_EXPANDS = ("coverage", "moving_average", "moving_avg")


@dataclass
class GraceHyperParams(HyperParams):
    """GRACE (Hartvigsen et al., NeurIPS 2023) hyper-parameters.

    * ``inner_params``: one entry, the module whose output GRACE replaces, written as
      EasyEdit does (``model.layers[27].mlp.down_proj.weight``; brackets and a trailing
      ``.weight``/``.bias`` are accepted). Keys live in the space of that module's input.
    * ``eps``: initial deferral radius of a new key (Euclidean distance, ``dist_fn: euc``).
    * ``edit_lr``, ``n_iter``: Adam learning rate and steps that train a key's value.
      ``reg: early_stop`` stops once the edit's target loss is below 0.01.
    * ``val_init``: ``cold`` (uniform random value, as upstream) or ``warm`` (the module's
      own output at the key token).
    * ``replacement``: ``replace_last`` (only the matching token's output is replaced) or
      ``replace_all`` (causal reading: the matching token and every later token).
    * ``eps_expand``: ``coverage`` (radius grows to the new query) or ``moving_average``
      (key moves halfway to the query, radius = distance).
    * ``val_reg``, ``num_pert``, ``dropout``: accepted for upstream compatibility, unused
      (``val_train`` supports ``sgd`` only).
    """

    model_name: Any = None
    inner_params: List[str] = field(default_factory=lambda: ["model.layers[27].mlp.down_proj.weight"])
    edit_lr: float = 1.0
    n_iter: int = 50
    eps: float = 1.0
    dist_fn: str = "euc"
    val_init: str = "cold"
    val_train: str = "sgd"
    val_reg: Any = None
    reg: str = "early_stop"
    replacement: str = "replace_last"
    eps_expand: str = "coverage"
    num_pert: Any = 8
    dropout: float = 0.0
    device: Union[int, str] = 0
    alg_name: str = "GRACE"
    batch_size: int = 1
    max_length: int = 30
    model_parallel: bool = False

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ValueError(f"GRACE hparams key {key!r}: {why}, got {getattr(self, key)!r}")

        for key in ("edit_lr", "eps", "dropout"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    setattr(self, key, float(value))
                except ValueError:
                    pass
        check(self.alg_name == "GRACE", "alg_name", "must be 'GRACE'")
        check(isinstance(self.inner_params, list) and len(self.inner_params) == 1
              and isinstance(self.inner_params[0], str), "inner_params",
              "must be a list with one module name")
        check(_num(self.edit_lr) and self.edit_lr > 0, "edit_lr", "must be a positive number")
        check(_num(self.eps) and self.eps > 0, "eps", "must be a positive number")
        check(isinstance(self.n_iter, int) and self.n_iter >= 1, "n_iter", "must be >= 1")
        check(self.dist_fn in DIST_FNS, "dist_fn", f"must be one of {DIST_FNS}")
        check(self.val_init in VAL_INITS, "val_init", f"must be one of {VAL_INITS}")
        check(self.val_train in VAL_TRAINS, "val_train",
              f"must be one of {VAL_TRAINS} (perturbation training is not implemented)")
        check(self.replacement in REPLACEMENTS, "replacement", f"must be one of {REPLACEMENTS}")
        check(self.eps_expand in EPS_EXPANDS, "eps_expand", f"must be one of {EPS_EXPANDS}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
              "must be a positive integer")

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str) -> "GraceHyperParams":
        """Load a YAML file by path, path without ``.yaml``, or shipped name; a relative
        ``model_name`` is resolved as :mod:`lemoe_easyedit.hparams_files` says."""
        path = find_hparams_file(hparams_name_or_path, "GRACE")
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of hparams")
        config = super().construct_float_from_scientific_notation(config)
        if config.get("alg_name") != "GRACE":
            raise ValueError(f"{path}: alg_name must be 'GRACE', got {config.get('alg_name')!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{path}: unknown GRACE key(s) {unknown}")
        if "model_name" in config:
            config["model_name"] = resolve_relative(config["model_name"], path)
        return cls(**config)

    @property
    def module_path(self) -> str:
        """``inner_params[0]`` as a dotted module path."""
        name = self.inner_params[0].replace("[", ".").replace("]", "")
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return name


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
