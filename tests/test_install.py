"""The package as a user installs it (a wheel, not this checkout), and the YAML files it
ships: the same files as the top-level ``hparams/``, found by name from any directory."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a wheel is built from (the rest of the checkout is not part of the distribution).
DISTRIBUTED = ("lemoe_easyedit", "hparams", "setup.cfg", "pyproject.toml", "README.md")


def _yaml_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*.yaml"))}


def test_shipped_hparams_are_the_top_level_files():
    from lemoe_easyedit.hparams_files import shipped_hparams, shipped_hparams_dir

    top = _yaml_files(REPO / "hparams")
    assert "LEMoE/tiny-llama.yaml" in top
    assert _yaml_files(shipped_hparams_dir()) == top
    assert "llama-7b" in shipped_hparams("LEMoE") and "testbed-llama" in shipped_hparams("ROME")


def test_names_and_relative_model_paths_resolve_from_another_directory(tmp_path,
                                                                       monkeypatch):
    from lemoe_easyedit import LEMoEHyperParams
    from lemoe_easyedit.grace import GraceHyperParams
    from lemoe_easyedit.hparams_files import find_hparams_file, resolve_relative

    monkeypatch.chdir(tmp_path)
    hp = LEMoEHyperParams.from_hparams("testbed-llama")
    assert Path(hp.model_name).is_dir(), hp.model_name
    assert Path(GraceHyperParams.from_hparams("testbed-llama").model_name).is_dir()
    assert find_hparams_file("testbed-llama", "MEMIT").name == "testbed-llama.yaml"
    # Relative to the YAML's folder; a hub name stays a hub name.
    (tmp_path / "cfg" / "model").mkdir(parents=True)
    assert resolve_relative("model", tmp_path / "cfg" / "x.yaml") == str(tmp_path / "cfg" /
                                                                        "model")
    assert resolve_relative("meta-llama/Llama-2-7b-hf", tmp_path / "cfg" / "x.yaml") == \
        "meta-llama/Llama-2-7b-hf"
    with pytest.raises(FileNotFoundError, match="names shipped for LEMoE: .*llama-7b"):
        LEMoEHyperParams.from_hparams("no-such-model")


@pytest.mark.slow
def test_wheel_ships_the_yamls_and_runs_a_demo_elsewhere(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in DISTRIBUTED:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, env=env, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lemoe_easyedit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {n[len("lemoe_easyedit/shipped_hparams/"):]: z.read(n) for n in names
                   if n.startswith("lemoe_easyedit/shipped_hparams/") and n.endswith(".yaml")}
    assert shipped == _yaml_files(REPO / "hparams")
    assert "lemoe_easyedit/testbed_assets/tiny-llama-factworld/model.safetensors" in names
    assert not any(n.startswith("benchmarks/") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, env=env, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        import lemoe_easyedit
        site = Path({str(site)!r})
        assert site in Path(lemoe_easyedit.__file__).parents, lemoe_easyedit.__file__
        from lemoe_easyedit import LEMoEHyperParams
        hp = LEMoEHyperParams.from_hparams("testbed-llama")
        assert site in Path(hp.model_name).parents, hp.model_name
        from lemoe_easyedit.cli import main
        sys.exit(main(["demo", "--num-edits", "2", "--examples", "1", "--out", "demo"]))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1",
                                   OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (elsewhere / "demo").is_dir()
