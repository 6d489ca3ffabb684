"""Tests of lemoe_easyedit.easyedit (the EasyEdit bridge): the EasyEdit release imported and running ROME, MEMIT and
FT on tiny local models on CPU, the scoping of every patch, and the upstream form.

No network: models and tokenizers are built locally, statistics come from a local file.
Checks that need a fresh interpreter (import side effects, bytecode caches) run in
subprocesses.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

from lemoe_easyedit import easyedit as bridge  # noqa: E402
from lemoe_easyedit.easyedit import baselines, devices, registry, release  # noqa: E402
from lemoe_easyedit.testing import DEFAULT_CORPUS, build_tiny_model  # noqa: E402

TEMPLATES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj",
                  layer_module_tmp="model.layers.{}", mlp_module_tmp="model.layers.{}.mlp",
                  attn_module_tmp="model.layers.{}.self_attn", ln_f_module="model.norm",
                  lm_head_module="lm_head"),
    # GPT-2 ties lm_head to the input embeddings, so named_parameters (which MEMIT's
    # compute_z searches) only has the tied weight under transformer.wte, as in
    # EasyEdit's own gpt2-xl hparams.
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
                 layer_module_tmp="transformer.h.{}", mlp_module_tmp="transformer.h.{}.mlp",
                 attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f",
                 lm_head_module="transformer.wte"),
}

# Tiny models have 4 layers; edit layer 1, tie the loss to the last one.
ALG_PARAMS = {
    "ROME": dict(layers=[1], fact_token="subject_last", v_num_grad_steps=3, v_lr=0.5,
                 v_loss_layer=3, v_weight_decay=0.001, clamp_norm_factor=4, kl_factor=0.0625,
                 mom2_adjustment=True, context_template_length_params=[[5, 5]],
                 mom2_n_samples=20, mom2_dtype="float32"),
    "MEMIT": dict(layers=[1], layer_selection="all", fact_token="subject_last",
                  v_num_grad_steps=3, v_lr=0.5, v_loss_layer=3, v_weight_decay=0.001,
                  clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_update_weight=15000, mom2_n_samples=20, mom2_dtype="float32",
                  batch_size=1),
    "FT": dict(layers=[1], num_steps=3, lr=5e-4, weight_decay=0, kl_factor=0,
               norm_constraint=False, batch_size=1),
}


def run_python(cwd: Path, *parts: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run the concatenated (each dedented) code parts in a fresh interpreter."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let plain imports cache bytecode as usual
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


# The bridge alone: lemoe_easyedit/__init__.py imports nothing eagerly.
LOAD_BRIDGE = f"""
import sys
sys.path.insert(1, {str(REPO)!r})
from lemoe_easyedit import easyedit as bridge
from lemoe_easyedit.easyedit import devices, registry, release
"""

# A plain import of the release, with placeholders for the optional packages and the
# transformers names it needs, written independently of bridge.
PLAIN_IMPORT = """
import importlib.abc, importlib.machinery, importlib.util, sys, types
import transformers.modeling_utils as _mu, transformers.pytorch_utils as _pu
import torch
for _n in ("apply_chunking_to_forward", "prune_linear_layer",
           "find_pruneable_heads_and_indices"):
    if not hasattr(_mu, _n):
        setattr(_mu, _n, getattr(_pu, _n, None) or (lambda *a, **k: None))
_ROOTS = {"omegaconf", "hydra", "timm", "torchvision", "cv2", "openai",
          "sentence_transformers", "nltk", "iopath", "einops", "peft", "datasets",
          "fairscale", "seaborn", "pandas"}
class _Ph(types.ModuleType):
    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        return type(k, (), {})
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        root = name.split(".")[0]
        if root not in _ROOTS:
            return None
        if "." not in name and importlib.machinery.PathFinder.find_spec(root) is not None:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Ph(spec.name); m.__path__ = []; return m
    def exec_module(self, m):
        pass
sys.meta_path.append(_Finder())
import easyeditor
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: with several intra-op threads on a busy machine, OpenMP spin-waiting
    # made a MEMIT edit 100x slower than on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ee():
    return bridge.load_easyeditor()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = DEFAULT_CORPUS * 4 + ["", "   ", "Paris is the capital and largest city of France."]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(family, root) for family in ("llama", "gpt2")}


def write_hparams(ee, tmp_path, alg, family, model_dir, **extra):
    config = dict(alg_name=alg, model_name=str(model_dir), device=0, max_length=40,
                  model_parallel=False, **TEMPLATES[family], **ALG_PARAMS[alg])
    if alg in ("ROME", "MEMIT"):
        config["stats_dir"] = str(tmp_path / "stats")
    config.update(extra)
    path = tmp_path / f"{alg}-{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    cls = {"ROME": ee.ROMEHyperParams, "MEMIT": ee.MEMITHyperParams,
           "FT": ee.FTHyperParams}[alg]
    return cls.from_hparams(str(path))


def numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float, np.number)) and not isinstance(tree, bool):
        yield float(tree)


# ----------------------------------------------------------------------- devices


def test_resolve_device_on_this_machine():
    cuda = torch.cuda.is_available()
    expected_index = torch.device("cuda", 0) if cuda else torch.device("cpu")
    assert bridge.resolve_device(0) == expected_index
    assert bridge.resolve_device("0") == expected_index
    assert bridge.resolve_device(0.0) == expected_index  # EasyEdit's YAML loader floats "0"
    assert bridge.resolve_device(-1) == torch.device("cpu")
    assert bridge.resolve_device("cpu") == torch.device("cpu")
    assert bridge.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not cuda:
        with pytest.warns(RuntimeWarning):
            assert bridge.resolve_device("cuda:1") == torch.device("cpu")
    else:
        assert bridge.resolve_device("cuda:1") == torch.device("cuda", 1)
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert bridge.resolve_device("mps") == torch.device("cpu")
    with pytest.raises(TypeError):
        bridge.resolve_device(True)


# ------------------------------------------------------------- loading the release


def test_load_is_idempotent_and_release_detected(ee):
    assert bridge.load_easyeditor() is ee
    assert ee.__name__ == "easyeditor"
    assert bridge.is_release() and bridge.is_release(ee)
    assert not bridge.uses_callable_restore()
    finders = [f for f in sys.meta_path if isinstance(f, devices._ReleaseSourceFinder)]
    assert len(finders) == 1


def _pycache_snapshot(package_dir: Path):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in package_dir.rglob("__pycache__/*.pyc")}


def test_fresh_processes_scoped_patches_and_clean_bytecode(tmp_path):
    """In a fresh interpreter, load_easyeditor leaves torch, transformers, sys.modules and
    the root logger as they were and writes no bytecode; a plain import of easyeditor in
    another interpreter afterwards gets the original code, and calling load_easyeditor
    after such a plain import warns and still applies the runtime patches.
    (One test, because each interpreter has to import torch, transformers and easyeditor.)
    """
    import importlib.util

    package_dir = Path(importlib.util.find_spec("easyeditor").origin).parent
    before = _pycache_snapshot(package_dir)
    code = LOAD_BRIDGE, """
    import importlib.util, logging, sys, torch, transformers
    import transformers.modeling_utils as mu
    names = release._REMOVED_MODELING_UTILS
    optional = list(release._OPTIONAL_PACKAGES)
    missing = [r for r in optional if importlib.util.find_spec(r) is None]
    logging.getLogger().setLevel(logging.WARNING)
    before = dict(
        modeling_utils={n: hasattr(mu, n) for n in names},
        root_level=logging.getLogger().level,
        root_handlers=list(logging.getLogger().handlers),
        hook=torch.nn.Module.register_forward_hook,
        loader=torch.utils.data.DataLoader,
        from_pretrained=transformers.AutoModelForCausalLM.from_pretrained.__func__,
        decoder_forward=transformers.LlamaForCausalLM.forward,
    )
    ee = bridge.load_easyeditor()
    assert bridge.load_easyeditor() is ee
    after = dict(
        modeling_utils={n: hasattr(mu, n) for n in names},
        root_level=logging.getLogger().level,
        root_handlers=list(logging.getLogger().handlers),
        hook=torch.nn.Module.register_forward_hook,
        loader=torch.utils.data.DataLoader,
        from_pretrained=transformers.AutoModelForCausalLM.from_pretrained.__func__,
        decoder_forward=transformers.LlamaForCausalLM.forward,
    )
    assert before == after, (before, after)
    for root in missing:
        leftovers = [m for m in sys.modules if m == root or m.startswith(root + ".")]
        assert not leftovers, leftovers
        assert importlib.util.find_spec(root) is None
        try:
            __import__(root)
        except ImportError:
            pass
        else:
            raise AssertionError(root + " importable after load_easyeditor")
    # easyeditor keeps its placeholder, which fails loudly when used.
    if "omegaconf" in missing:
        base_model = sys.modules["easyeditor.trainer.blip2_models.base_model"]
        try:
            base_model.OmegaConf.load("x.yaml")
        except ImportError as exc:
            assert "'omegaconf'" in str(exc) and "pip install omegaconf" in str(exc)
        else:
            raise AssertionError("placeholder did not raise")
    # Rewritten device strings in easyeditor's code.
    eu = sys.modules["easyeditor.evaluate.evaluate_utils"]
    assert "__lemoe_device__" in eu.test_batch_prediction_acc.__code__.co_names
    assert logging.getLogger("easyeditor").getEffectiveLevel() == logging.INFO
    print("OK")
    """
    assert "OK" in run_python(tmp_path, *code).stdout
    assert _pycache_snapshot(package_dir) == before, "bytecode written for easyeditor"

    # Stale rewritten bytecode would show up here as __lemoe_device__ in the code.
    code = PLAIN_IMPORT, LOAD_BRIDGE, """
    import warnings
    eu = sys.modules["easyeditor.evaluate.evaluate_utils"]
    names = eu.test_batch_prediction_acc.__code__.co_names
    assert "__lemoe_device__" not in names, names
    assert "__lemoe_device__" not in vars(eu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ee = bridge.load_easyeditor()
    assert ee is sys.modules["easyeditor"]
    assert any("imported before" in str(w.message) for w in caught), caught
    assert getattr(sys.modules["easyeditor.util.alg_dict"].ALG_DICT["ROME"],
                   "_lemoe_patched", False)
    # What only ROME/MEMIT need is loaded on their first call, not before.
    nethook = sys.modules["easyeditor.util.nethook"]
    assert not getattr(nethook.Trace, "_lemoe_patched", False)
    assert "lemoe_easyedit.easyedit.baselines" not in sys.modules
    from lemoe_easyedit.easyedit import baselines
    baselines.patch_release()
    assert getattr(nethook.Trace, "_lemoe_patched", False)
    print("PLAIN")
    """
    assert "PLAIN" in run_python(tmp_path, *code).stdout


def test_missing_easyeditor_names_the_install_command(tmp_path):
    code = LOAD_BRIDGE, """
    import sys
    sys.modules["easyeditor"] = None  # the standard way to make a package unimportable
    try:
        bridge.load_easyeditor()
    except ImportError as exc:
        assert "pip install --no-deps easyeditor==0.0.1.dev0" in str(exc), str(exc)
        print("OK")
    """
    assert "OK" in run_python(tmp_path, *code).stdout


def test_broken_upstream_checkout_reports_its_own_import_error(tmp_path):
    """A checkout that fails on a dependency of its own: the user sees that error, raised
    where LEMoE's names are taken, not advice to install the 2023 release."""
    pkg = tmp_path / "checkout" / "easyeditor"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import lemoe_missing_dependency_of_upstream\n")
    code = f"import sys\nsys.path.insert(0, {str(pkg.parent)!r})\n", LOAD_BRIDGE, """
    import lemoe_easyedit
    try:
        from lemoe_easyedit import LEMoEHyperParams
    except ImportError as exc:
        text = str(exc)
        assert "failed to import" in text and "checkout" in text, text
        assert "lemoe_missing_dependency_of_upstream" in text, text
        assert "easyeditor" not in sys.modules
        print("OK")
    """
    assert "OK" in run_python(tmp_path, *code).stdout


# --------------------------------------------------------------- registering


def test_register_method_release(ee):
    from dataclasses import dataclass

    @dataclass
    class LemoeCompatTestHyperParams:
        alg_name: str = "LEMOE_COMPAT_TEST"

    def apply_fn(model, tok, requests, hparams, **kwargs):
        return model, {}

    alg_dict_mod = sys.modules["easyeditor.util.alg_dict"]
    editor_mod = sys.modules["easyeditor.editors.editor"]
    batch_editor = sys.modules["easyeditor.editors.batch_editor"].BatchEditor
    try:
        bridge.register_method("LEMOE_COMPAT_TEST", apply_fn, LemoeCompatTestHyperParams)
        assert alg_dict_mod.ALG_DICT["LEMOE_COMPAT_TEST"] is apply_fn
        assert editor_mod.ALG_DICT is alg_dict_mod.ALG_DICT
        assert batch_editor.is_batchable_method("LEMOE_COMPAT_TEST")
        assert batch_editor.is_batchable_method("MEMIT")  # the release's names still hold
        assert not batch_editor.is_batchable_method("ROME")
        assert ee.LemoeCompatTestHyperParams is LemoeCompatTestHyperParams
        bridge.register_method("LEMOE_COMPAT_TEST", apply_fn)  # again: harmless
        assert not hasattr(alg_dict_mod, "CALLABLE_RESTORE_ALGS")
    finally:
        alg_dict_mod.ALG_DICT.pop("LEMOE_COMPAT_TEST", None)
        registry._EXTRA_BATCHABLE.discard("LEMOE_COMPAT_TEST")
        if getattr(ee, "LemoeCompatTestHyperParams", None) is LemoeCompatTestHyperParams:
            delattr(ee, "LemoeCompatTestHyperParams")


#: An upstream-shaped easyeditor: what upstream's BaseEditor.edit does with a method, as of
#: its git HEAD (edit_requests asserts batch_size == 1; without sequential_edit each edit is
#: scored and then undone through the callable weights_copy of CALLABLE_RESTORE_ALGS).
UPSTREAM_EDITOR = textwrap.dedent("""
    from ..util.alg_dict import *
    from .batch_editor import BatchEditor

    class BaseEditor:
        def __init__(self, hparams, model, tok):
            self.hparams, self.model, self.tok = hparams, model, tok
            self.alg_name = hparams.alg_name
            self.apply_algo = ALG_DICT[self.alg_name]

        def edit(self, prompts, target_new, subject=None, sequential_edit=False, **kwargs):
            requests = [{"prompt": p, "target_new": t, "subject": s}
                        for p, t, s in zip(prompts, target_new, subject)]
            return self.edit_requests(requests, sequential_edit)

        def edit_requests(self, requests, sequential_edit=False):
            if hasattr(self.hparams, 'batch_size'):  # For Singleton Editing, bs=1
                assert self.hparams.batch_size == 1, 'Single Editing: batch_size should be set to 1'
            for request in requests:
                edited_model, weights_copy = self.apply_algo(
                    self.model, self.tok, [request], self.hparams, copy=False,
                    return_orig_weights=True, keep_original_weight=False)
                if not sequential_edit and self.alg_name in CALLABLE_RESTORE_ALGS:
                    weights_copy()
            return [], edited_model, weights_copy
    """)


def _upstream_package(tmp_path: Path) -> Path:
    """Write the upstream-shaped package; returns the folder to put on sys.path."""
    pkg = tmp_path / "checkout" / "easyeditor"
    files = {
        "__init__.py": "from .editors import *\n",
        "util/__init__.py": "",
        "util/alg_dict.py": "ALG_DICT = {}\nCALLABLE_RESTORE_ALGS = set()\n",
        "util/hparams.py": "from dataclasses import dataclass\n"
                           "@dataclass\nclass HyperParams:\n    pass\n",
        "editors/__init__.py": "from .editor import *\n",
        "editors/editor.py": UPSTREAM_EDITOR,
        "editors/batch_editor.py": textwrap.dedent("""
            from enum import Enum
            class BatchEditor(Enum):
                MEMIT = 'MEMIT'
                @staticmethod
                def is_batchable_method(alg_name):
                    return alg_name == BatchEditor.MEMIT.value
            """),
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg.parent


def test_upstream_shaped_package_is_used_unpatched(tmp_path):
    pkg = tmp_path / "checkout" / "easyeditor"
    _upstream_package(tmp_path)
    code = f"import sys\nsys.path.insert(0, {str(pkg.parent)!r})\n", LOAD_BRIDGE, """
    ee = bridge.load_easyeditor()
    assert ee.__file__.startswith(sys.path[0]), ee.__file__
    assert bridge.is_release() is False and bridge.is_release(ee) is False
    assert bridge.uses_callable_restore() is True
    def apply_lemoe(model, tok, requests, hparams, **kwargs):
        return model, (lambda: None)
    bridge.register_method("LEMoE", apply_lemoe)
    alg = sys.modules["easyeditor.util.alg_dict"]
    editor = sys.modules["easyeditor.editors.editor"]
    assert alg.ALG_DICT["LEMoE"] is apply_lemoe and editor.ALG_DICT is alg.ALG_DICT
    assert "LEMoE" in alg.CALLABLE_RESTORE_ALGS
    assert editor.BatchEditor.is_batchable_method("LEMoE")
    # Unpatched: no device rewriting, BaseEditor.__init__ as it is (only edit() learns
    # the registered methods).
    assert "__lemoe_device__" not in vars(editor)
    assert not hasattr(editor.BaseEditor.__init__, "_lemoe_patched")
    assert not any(isinstance(f, devices._ReleaseSourceFinder) for f in sys.meta_path)
    print("OK")
    """
    assert "OK" in run_python(tmp_path, *code).stdout


def test_lemoe_edit_on_upstream_shape_with_shipped_yaml(tmp_path, tiny_models):
    """edit() with a YAML whose batch_size is 20 (the batch_edit call size): it runs, the
    hparams keep 20, and the edit persists only with sequential_edit=True, as upstream's
    edit() does."""
    checkout = _upstream_package(tmp_path)
    yaml_file = REPO / "hparams" / "LEMoE" / "tiny-llama.yaml"
    assert yaml.safe_load(yaml_file.read_text())["batch_size"] > 1
    code = f"import sys\nsys.path.insert(0, {str(checkout)!r})\n", LOAD_BRIDGE, f"""
    import torch, yaml
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lemoe_easyedit import LEMoEHyperParams, find_adaptor, find_edit
    from easyeditor import BaseEditor
    assert sys.modules["easyeditor"].__file__.startswith({str(checkout)!r})
    cfg = yaml.safe_load(open({str(yaml_file)!r}))
    cfg["model_name"] = {str(tiny_models["llama"])!r}
    hp = LEMoEHyperParams.from_dict(cfg)
    model = AutoModelForCausalLM.from_pretrained(hp.model_name)
    tok = AutoTokenizer.from_pretrained(hp.model_name)
    editor = BaseEditor(hp, model, tok)
    prompt = "The mother tongue of Danielle Darrieux is"
    args = dict(prompts=[prompt], target_new=["English"], subject=["Danielle Darrieux"])
    editor.edit(**args)
    assert hp.batch_size == cfg["batch_size"]
    assert find_adaptor(editor.model) is None or find_edit(editor.model, prompt) is None
    editor.edit(**args, sequential_edit=True)
    assert hp.batch_size == cfg["batch_size"]
    assert find_edit(editor.model, prompt) is not None
    print("OK")
    """
    assert "OK" in run_python(tmp_path, *code).stdout


# ------------------------------------------------------------------ nethook / padding


def test_trace_presents_decoder_block_output_as_tuple(ee, tiny_models):
    from transformers import AutoModelForCausalLM

    baselines.patch_release()  # what ROME's or MEMIT's first call does
    nethook = sys.modules["easyeditor.util.nethook"]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = model(input_ids=ids).logits

    def edit(cur_out, cur_layer):
        if cur_layer == "model.layers.1":
            cur_out[0][0, 1, :] += 1.0  # MEMIT's compute_z indexing
        return cur_out

    with torch.no_grad(), nethook.TraceDict(model, ["model.layers.3", "model.layers.1"],
                                            edit_output=edit) as tr:
        edited = model(input_ids=ids).logits
    assert isinstance(tr["model.layers.3"].output, tuple)
    assert tr["model.layers.3"].output[0].shape == (1, 4, 32)
    assert not torch.allclose(base, edited)
    # Outside easyeditor's Trace the block still returns a bare tensor.
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    assert isinstance(seen[0], torch.Tensor)
    # Non-block layers are traced exactly as before.
    with torch.no_grad(), nethook.Trace(model, "model.layers.1.mlp") as t:
        model(input_ids=ids)
    assert isinstance(t.output, torch.Tensor)


def test_rome_and_memit_run_with_right_padding(ee):
    alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
    assert alg_dict["ROME"]._lemoe_patched and alg_dict["MEMIT"]._lemoe_patched

    class Tok:
        padding_side = "left"

    seen = []
    wrapped = baselines.with_right_padding(lambda model, tok, *a, **k: seen.append(tok.padding_side))
    tok = Tok()
    wrapped(None, tok, [], None)
    assert seen == ["right"] and tok.padding_side == "left"
    with pytest.raises(ZeroDivisionError):
        baselines.with_right_padding(lambda model, tok: 1 / 0)(None, tok)
    assert tok.padding_side == "left"


# ------------------------------------------------------------------- statistics


def _stats_files(stats_dir: Path):
    return sorted(stats_dir.rglob("*.npz"))


def _assert_finite_npz(path: Path):
    with np.load(path, allow_pickle=True) as data:
        arrays = [data[k] for k in data.files if data[k].dtype.kind in "fc"]
    assert arrays and all(np.isfinite(a).all() for a in arrays)


def test_layer_stats_local_hub_and_nan(ee, tiny_models, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layer_stats = sys.modules["easyeditor.models.rome.layer_stats"].layer_stats
    assert sys.modules["easyeditor.models.rome.compute_u"].layer_stats is layer_stats
    assert sys.modules["easyeditor.models.memit.memit_main"].layer_stats is layer_stats
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    hp = type("HP", (), {"device": 0})()
    stats_dir = tmp_path / "stats"
    layer = "model.layers.1.mlp.down_proj"
    args = dict(to_collect=["mom2"], sample_size=10, precision="float32", hparams=hp)

    # Hub name, no cache: a clear error, nothing downloaded or written.
    with pytest.raises(ValueError, match="mom2_dataset.*local text file"):
        layer_stats(model, tok, layer, stats_dir, "wikipedia", **args)
    assert not _stats_files(stats_dir)

    # Local file, in each accepted format: the cache file name is stem + content hash.
    stat = layer_stats(model, tok, layer, stats_dir, str(corpus), **args)
    (cache,) = _stats_files(stats_dir)
    assert cache.parent.name.startswith("corpus-") and str(tmp_path) not in cache.name
    _assert_finite_npz(cache)
    assert stat.mom2.moment().shape == (64, 64)
    texts = [line for line in corpus.read_text().splitlines() if line.strip()]
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"text": t} for t in texts]))
    as_jsonl = tmp_path / "docs.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(t) for t in texts))
    for path in (as_json, as_jsonl):
        other = layer_stats(model, tok, layer, stats_dir, str(path), **args)
        assert torch.allclose(other.mom2.moment(), stat.mom2.moment(), atol=1e-5)

    # A cache under the hub name is used as it is.
    hub_dir = cache.parent.parent / "wikipedia_stats"
    hub_dir.mkdir()
    (hub_dir / cache.name).write_bytes(cache.read_bytes())
    from_cache = layer_stats(model, tok, layer, stats_dir, "wikipedia", **args)
    assert torch.allclose(from_cache.mom2.moment(), stat.mom2.moment())

    with pytest.raises(ValueError, match="does not exist"):
        layer_stats(model, tok, layer, stats_dir, str(tmp_path / "nope.txt"), **args)

    # Non-finite statistics raise and leave no cache behind.
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(float("nan"))
    nan_dir = tmp_path / "nan-stats"
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer_stats(model, tok, layer, nan_dir, str(corpus), **args)
    assert not _stats_files(nan_dir)


# ------------------------------------------------------------- editing end to end


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alg", ["ROME", "MEMIT", "FT"])
def test_edit_runs_on_cpu(ee, tiny_models, corpus, tmp_path, monkeypatch, alg, family):
    monkeypatch.chdir(tmp_path)  # BaseEditor writes ./logs/run.log
    extra = {"mom2_dataset": str(corpus)} if alg in ("ROME", "MEMIT") else {}
    hparams = write_hparams(ee, tmp_path, alg, family, tiny_models[family], **extra)
    editor = ee.BaseEditor.from_hparams(hparams)
    assert editor.model_name == hparams.model_name == str(tiny_models[family])
    assert next(editor.model.parameters()).device == bridge.resolve_device(0)
    assert editor.tok.padding_side == ("right" if alg in ("ROME", "MEMIT") else "left")
    metrics, edited_model, _ = editor.edit(
        prompts=["The capital of France is"], target_new=["Paris"],
        ground_truth=["London"], subject=["France"],
        locality_inputs={"nq": {"prompt": ["The Eiffel Tower is located in"],
                                "ground_truth": ["Paris"]}})
    assert len(metrics) == 1 and "post" in metrics[0] and "pre" in metrics[0]
    values = list(numbers(metrics[0]["post"])) + list(numbers(metrics[0]["pre"]))
    assert values and all(math.isfinite(v) for v in values), metrics
    assert metrics[0]["post"]["rewrite_acc"]
    assert all(torch.isfinite(p).all() for p in edited_model.parameters())
    assert (tmp_path / "logs" / "run.log").exists()
    if alg in ("ROME", "MEMIT"):
        files = _stats_files(tmp_path / "stats")
        assert len(files) == 1
        _assert_finite_npz(files[0])


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_load_through_base_editor(ee, family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = build_tiny_model(family, tmp_path)
    hparams = write_hparams(ee, tmp_path, "FT", "llama", model_dir)
    editor = ee.BaseEditor(hparams)
    assert family in type(editor.model).__name__.lower()
    assert editor.model_name == hparams.model_name == str(model_dir)
    assert editor.tok.pad_token is not None and editor.tok.padding_side == "left"
    assert next(editor.model.parameters()).device == bridge.resolve_device(0)
    assert editor.model.dtype == torch.float32
