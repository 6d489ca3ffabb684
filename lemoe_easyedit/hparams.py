"""``LEMoEHyperParams``: the method's configuration, loaded from YAML like any EasyEdit method."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from .easyedit import load_easyeditor
from .hparams_files import find_hparams_file, resolve_relative, shipped_hparams_dir
from .routing import QUERY_POOLS, ROUTERS, SUBJECT_ROUTER

load_easyeditor()
from easyeditor.util.hparams import HyperParams  # noqa: E402  (needs the bridge first)

EXPERT_FORMS = ("ffn", "lora")
EXPERT_INITS = ("copy", "random")
KEY_INITS = ("random", "centroid")
TORCH_DTYPES = ("float32", "bfloat16", "float16")

#: Where the YAML files of this repository live (found by name, e.g. "tiny-llama").
#: The LEMoE YAML files shipped with the package (see :mod:`.hparams_files`).
HPARAMS_DIR = shipped_hparams_dir() / "LEMoE"


@dataclass
class LEMoEHyperParams(HyperParams):
    """Hyper-parameters of LEMoE (Wang & Li, EMNLP 2024) plus this project's extensions.

    Paper values: ``layer`` 18 of 32 for 7B models, AdamW with ``lr`` 2e-4, ``top_k`` 1,
    ``expert_scale`` (lambda) 1, ``edits_per_expert`` 200 (five experts for T=1000).
    Every field is validated in ``__post_init__``; a bad value raises ValueError naming it.
    """

    # EasyEdit's fields, read by BaseEditor and the metric functions.
    model_name: Any
    alg_name: str = "LEMoE"
    device: Union[int, str] = 0
    model_parallel: bool = False
    max_length: int = 40
    batch_size: int = 1
    #: The dtype EasyEdit's ``BaseEditor`` loads the model in: ``float32`` (null: the
    #: default), ``bfloat16`` or ``float16``. Experts are stored and served in the model's
    #: dtype and trained through float32 master copies; routing is float32 throughout.
    torch_dtype: Optional[str] = None
    #: Upstream EasyEdit's switch for ``float16`` (same as ``torch_dtype: float16``).
    fp16: bool = False

    # Module insertion.
    layer: int = 18
    expert_form: str = "ffn"
    expert_width: Optional[int] = None
    expert_init: str = "copy"
    lora_rank: int = 8
    expert_scale: float = 1.0

    # Routing.
    top_k: int = 1
    #: ``anchor``: the expert of the nearest anchor (KV anchor routing); ``learned``: the
    #: best ``k . v(q)`` score (the paper's router); ``subject``: the expert of the last
    #: edit subject found in the input ids, carried to the end of the sequence (our
    #: extension for people's phrasings, :mod:`.subjects`; top-1, needs each request's
    #: ``subject``). The locality guard, if on, applies to all three.
    router: str = "anchor"
    #: ``prefix_mean`` / ``token``: queries from the embedding outputs (the paper's reading);
    #: ``ffn_input``: the adapted FFN's own input, contextual and equally frozen (measured
    #: best on the testbed, README "What the paper leaves open").
    query_pool: str = "ffn_input"
    router_dim: int = 64
    key_init: str = "centroid"
    route_loss_weight: float = 1.0
    route_lr: float = 1e-2
    route_steps: int = 200
    locality_guard: bool = True
    guard_threshold: float = 0.7
    #: ``router: subject`` only: a position is also served when an earlier position of its
    #: subject's run passed the guard, so that an answer goes on once its question was
    #: admitted (the guard compares each answer position with the edit's own answer
    #: positions, which a paraphrase's context moves away from).
    guard_carries: bool = False
    #: Subject swaps per edit to fit each anchor's acceptance radius from (``locality``):
    #: with the guard on, a query reaches an expert only inside its nearest anchor's radius.
    #: 0: no radii, the global ``guard_threshold`` alone decides.
    negatives_per_edit: int = 2
    #: The negatives of a call number at least this many prompts (the call's edits, the
    #: frozen experts' edits, swaps kept from earlier calls and the call's own swaps, added
    #: per edit as needed), so that a short stream's radii are fitted against as many
    #: negatives as a long one's; also the most swap prompts kept between calls.
    min_negatives: int = 2000
    #: Where an anchor's radius lies between its nearest negative (0) and itself (1).
    radius_margin: float = 0.35

    # Batches, order and training.
    edits_per_expert: int = 200
    max_experts: Optional[int] = None
    order_planning: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_steps: int = 200
    loss_threshold: float = 0.01
    #: Per edit, this many copies of its prompt with each token other than the first, the
    #: subject's and the last dropped with probability ``prompt_dropout`` train beside it
    #: (same target, answer routed as the edit's): a paraphrase moves the states the expert
    #: reads at the answer positions, and an expert fitted to one prompt's states alone
    #: garbles multi-token objects there. 0: the prompt alone (the paper).
    prompt_variants: int = 0
    prompt_dropout: float = 0.5
    train_batch_size: int = 16
    seed: int = 0
    #: Train each new expert from activations cached once per minibatch, running only the
    #: blocks above the adaptor (same losses and expert as full forwards, several times
    #: faster); false runs the whole model at every step.
    cached_activations: bool = True

    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.alg_name == "LEMoE", "alg_name", self.alg_name, "must be 'LEMoE'")
        _check(isinstance(self.model_name, (str, tuple, list)), "model_name", self.model_name,
               "must be a model path or name")
        _check(_is_int(self.max_length) and self.max_length > 0, "max_length", self.max_length,
               "must be a positive integer")
        _check(_is_int(self.batch_size) and self.batch_size > 0, "batch_size", self.batch_size,
               "must be a positive integer")
        _check(_is_int(self.layer) and self.layer >= 0, "layer", self.layer,
               "must be a non-negative integer")
        _choice(self, "expert_form", EXPERT_FORMS)
        _choice(self, "expert_init", EXPERT_INITS)
        _choice(self, "router", ROUTERS)
        _choice(self, "query_pool", QUERY_POOLS)
        _choice(self, "key_init", KEY_INITS)
        _check(self.expert_width is None or (_is_int(self.expert_width) and self.expert_width > 0),
               "expert_width", self.expert_width, "must be null or a positive integer")
        for name in ("lora_rank", "top_k", "router_dim", "edits_per_expert", "max_steps",
                     "train_batch_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        _check(self.router != SUBJECT_ROUTER or self.top_k == 1, "top_k", self.top_k,
               "must be 1 with router 'subject' (one expert per subject)")
        _check(not self.guard_carries or self.router == SUBJECT_ROUTER, "guard_carries",
               self.guard_carries, "needs router 'subject' (it carries the guard along a "
               "subject's run)")
        for name in ("route_steps", "negatives_per_edit", "min_negatives", "prompt_variants"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, value, "must be an integer >= 0")
        _check(self.max_experts is None or (_is_int(self.max_experts) and self.max_experts >= 1),
               "max_experts", self.max_experts, "must be null or an integer >= 1")
        for name in ("lr", "route_lr"):
            value = getattr(self, name)
            _check(_is_num(value) and value > 0, name, value, "must be a positive number")
        for name in ("weight_decay", "loss_threshold", "route_loss_weight"):
            value = getattr(self, name)
            _check(_is_num(value) and value >= 0, name, value, "must be a number >= 0")
        _check(_is_num(self.expert_scale), "expert_scale", self.expert_scale, "must be a number")
        _check(_is_num(self.radius_margin) and 0.0 <= self.radius_margin < 1.0,
               "radius_margin", self.radius_margin, "must be a number in [0, 1)")
        _check(_is_num(self.prompt_dropout) and 0.0 <= self.prompt_dropout < 1.0,
               "prompt_dropout", self.prompt_dropout, "must be a number in [0, 1)")
        _check(_is_num(self.guard_threshold) and -1.0 <= self.guard_threshold <= 1.0,
               "guard_threshold", self.guard_threshold, "must be a cosine in [-1, 1]")
        for name in ("model_parallel", "locality_guard", "guard_carries", "order_planning",
                     "cached_activations"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name),
                   "must be true or false")
        _check(_is_int(self.seed), "seed", self.seed, "must be an integer")
        _check(self.torch_dtype is None or self.torch_dtype in TORCH_DTYPES, "torch_dtype",
               self.torch_dtype, f"must be null or one of {', '.join(TORCH_DTYPES)}")
        _check(isinstance(self.fp16, bool), "fp16", self.fp16, "must be true or false")
        _check(not self.fp16 or self.torch_dtype in (None, "float16"), "fp16", self.fp16,
               f"contradicts torch_dtype {self.torch_dtype!r}")

    @classmethod
    def from_hparams(cls, hparams_name_or_path: Union[str, Path]) -> "LEMoEHyperParams":
        """Load a YAML file: a path, a path without ``.yaml``, or the name of a shipped file
        (``"llama-7b"``). A relative ``model_name`` is resolved as :mod:`.hparams_files` says."""
        path = resolve_hparams_path(hparams_name_or_path)
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: malformed YAML: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of hparams, got {type(config).__name__}")
        if "model_name" in config:
            config["model_name"] = resolve_relative(config["model_name"], path)
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "hparams") -> "LEMoEHyperParams":
        """Build from a dict, naming unknown or missing keys instead of a bare TypeError."""
        config = dict(config)
        if config.get("alg_name", "LEMoE") != "LEMoE":
            raise ValueError(f"{source}: alg_name must be 'LEMoE', got {config['alg_name']!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known, key=repr)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        if "model_name" not in config:
            raise ValueError(f"{source}: missing required key 'model_name'")
        for key in ("lr", "route_lr", "weight_decay", "loss_threshold", "guard_threshold",
                    "radius_margin", "prompt_dropout"):
            # YAML reads "2e-4" as a string; EasyEdit converts scientific notation the same way.
            if isinstance(config.get(key), str):
                try:
                    config[key] = float(config[key])
                except ValueError:
                    pass
        return cls(**config)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every field (``model_name`` as a string)."""
        out = dataclasses.asdict(self)
        if not isinstance(out["model_name"], str):
            out["model_name"] = repr(type(self.model_name))
        return json.loads(json.dumps(out, default=str))

    def check_model(self, model) -> None:
        """Checks that need the model: architecture supported and ``layer`` in range."""
        from .model_families import num_layers

        n = num_layers(model)
        if self.layer >= n:
            raise ValueError(f"layer={self.layer} is out of range: the model has {n} layers "
                             f"(valid: 0..{n - 1})")


def resolve_hparams_path(name_or_path: Union[str, Path]) -> Path:
    """Find a YAML file by path, path without suffix, or name among the shipped LEMoE files."""
    return find_hparams_file(name_or_path, "LEMoE")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)  # a huge int has no float (OverflowError)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"hparams key {key!r}: {why}, got {value!r}")


def _choice(hp: LEMoEHyperParams, key: str, choices) -> None:
    value = getattr(hp, key)
    _check(value in choices, key, value, f"must be one of {', '.join(choices)}")
