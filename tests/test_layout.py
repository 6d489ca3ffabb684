"""What importing costs: the package and the command line's help load no heavy module, and
the EasyEdit bridge loads what only the baselines need when a baseline runs."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Modules that `--help` and a bare import must not load.
HEAVY = ("torch", "transformers", "easyeditor", "lemoe_easyedit.evaluation",
         "lemoe_easyedit.demo", "lemoe_bench", "lemoe_easyedit.easyedit")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_help_and_import_load_no_heavy_module():
    out = _run(f"""
        import contextlib, io, sys
        import lemoe_easyedit
        from lemoe_easyedit.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as help_text:
            try:
                main(["--help"])
            except SystemExit as exit:
                assert exit.code == 0
        assert "compare" in help_text.getvalue() and "bench" in help_text.getvalue()
        loaded = [m for m in sys.modules if any(m == h or m.startswith(h + ".")
                                                for h in {HEAVY!r})]
        assert not loaded, loaded
        print("OK")
        """)
    assert "OK" in out


def test_registering_lemoe_loads_no_baseline_code():
    out = _run("""
        import sys
        from lemoe_easyedit import LEMoEHyperParams
        from easyeditor.util.alg_dict import ALG_DICT
        assert "LEMoE" in ALG_DICT
        assert "lemoe_easyedit.easyedit.baselines" not in sys.modules
        assert not any(m.startswith("lemoe_easyedit.evaluation") for m in sys.modules)
        print("OK")
        """)
    assert "OK" in out
