"""``run`` and ``compare``: the lifelong protocol of :mod:`.evaluation` from the command line.

::

    lemoe-easyedit run --method LEMoE --hparams hparams/LEMoE/testbed-llama.yaml \\
        --data testbed --num-edits 100 --chunk 50 --checkpoints 10 --out results/lemoe
    lemoe-easyedit compare --methods LEMoE ROME MEMIT GRACE FT \\
        --data testbed --num-edits 100 --out results/compare

``run`` edits and scores one method and writes ``OUT/results.json`` (per-edit and summary
metrics, hparams, package versions, seed, edit order, timings), ``OUT/summary.md`` and
``OUT/edit.log`` (what the editing functions printed). ``compare`` runs ``run`` for each
method **in its own process** on the same edits and writes ``OUT/compare.md``,
``OUT/compare.json`` and ``OUT/compare.png`` (Rel/Gen/Loc against the number of edits).
The ``lemoe-easyedit`` console script exposes the same subcommands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..realfact import integration as realfact_integration
from ..hparams_files import (PACKAGE_PARENT, find_hparams_file, resolve_relative,
                             shipped_hparams_dir)

__all__ = ["add_run_arguments", "run_command", "add_compare_arguments", "compare_command",
           "run", "compare", "DEFAULT_HPARAMS_DIR", "TESTBED_CORPUS"]

#: ``<METHOD>/<name>.yaml`` as shipped (the checkout's hparams/, or the installed copy).
DEFAULT_HPARAMS_DIR = shipped_hparams_dir()
#: ``mom2_dataset`` value meaning "the testbed world's training text, written on the fly".
TESTBED_CORPUS = "testbed-world"
#: Hparams file name used by ``compare`` for each data set when --hparams-name is not given.
DEFAULT_HPARAMS_NAME = {"testbed": "testbed-llama"}


# ----------------------------------------------------------------------- arguments


def _data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and protocol")
    g.add_argument("--data", required=True, choices=("testbed", "zsre", "counterfact",
                                                     "hallucination"),
                   help="benchmark: the embedded testbed or your copy of a public file")
    g.add_argument("--data-path", default=None,
                   help="data file (required for zsre/counterfact/hallucination; for the "
                        "testbed: an edit-set name or a JSON file of requests)")
    g.add_argument("--num-edits", type=int, default=None,
                   help="edits taken from the data (after --offset); default: all")
    g.add_argument("--offset", type=int, default=0, help="skip this many records first")
    g.add_argument("--chunk", type=int, default=None, metavar="T",
                   help="lifelong sequence length T; --num-edits is cut into consecutive "
                        "chunks of T, each from the unedited model, averaged (default: "
                        "--num-edits)")
    g.add_argument("--checkpoints", type=int, default=None, metavar="K",
                   help="also score the edits seen so far after every K edits")
    g.add_argument("--eval-metric", default="auto", choices=("auto", "token_em", "ppl"),
                   help="auto: ppl for hallucination, token_em otherwise")
    g.add_argument("--no-greedy", action="store_true",
                   help="skip the greedy whole-target exact-match scores")
    g.add_argument("--skip-malformed", action="store_true",
                   help="leave out malformed records (listed in a warning) instead of failing")
    g.add_argument("--subject-aligned", action="store_true",
                   help="keep only records whose subject ends on a token boundary of the "
                        "prompt for the model's tokenizer (EasyEdit's ROME/MEMIT index the "
                        "subject's last token wrongly, or past the prompt, otherwise); the "
                        "others are listed in a warning. Same edits for every method")
    g.add_argument("--same-subject-probes", action="store_true",
                   help="add a locality probe per record: its subject asked another "
                        "record's question (loc:same_subject; lemoe_easyedit.evaluation."
                        "probes), built after the known filter from all usable records")
    g.add_argument("--known", default="auto", choices=("auto", "on", "off"),
                   help="keep only records whose edit prompt, paraphrase and locality "
                        "prompts the unedited model answers by whole-object greedy exact "
                        "match (how many were left out, and why, is printed and recorded); "
                        "auto: on for a realfact model (lemoe_easyedit.realfact)")
    g.add_argument("--end-token", default="auto", choices=("auto", "on", "off"),
                   help="edit targets followed by the tokenizer's end token, as the model "
                        "ends its facts (scoring is unchanged); auto: on for a realfact model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--restore", default="auto", choices=("auto", "copy", "reload"),
                   help="how the unedited model is restored between chunks")
    g = p.add_argument_group("model and environment")
    g.add_argument("--model", default=None,
                   help="model path or name, overriding the hparams' model_name")
    g.add_argument("--device", default=None, help="override hparams.device (0, cpu, cuda:1)")
    g.add_argument("--max-length", type=int, default=None,
                   help="override the method's max_length (tokens it edits with; scoring "
                        "never truncates)")
    g.add_argument("--stats-dir", default=None, help="ROME/MEMIT: override stats_dir")
    g.add_argument("--mom2-dataset", default=None,
                   help="ROME/MEMIT: local text file for the second-moment statistics "
                        f"(or {TESTBED_CORPUS!r})")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--out", required=True, help="output directory")


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``run`` (also used by the ``lemoe-easyedit run`` subcommand)."""
    parser.add_argument("--method", required=True,
                        help="EasyEdit method name: LEMoE, ROME, MEMIT, FT, GRACE, ...")
    parser.add_argument("--hparams", required=True,
                        help="the method's hparams YAML file, or the name of a shipped one "
                             "(testbed-llama, llama-7b, ...)")
    _data_arguments(parser)
    return parser


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``compare``."""
    parser.add_argument("--methods", nargs="+", required=True,
                        help="methods to compare; METHOD or METHOD=path/to/hparams.yaml")
    parser.add_argument("--hparams-dir", default=str(DEFAULT_HPARAMS_DIR),
                        help="directory holding <METHOD>/<name>.yaml")
    parser.add_argument("--hparams-name", default=None,
                        help="file name (without .yaml) under <hparams-dir>/<METHOD>/; "
                             "default for --data testbed: testbed-llama")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed to each method's process")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a method's OUT/<METHOD>/results.json instead of running it "
                             "again when it was made by the same command and hparams")
    _data_arguments(parser)
    return parser


# ----------------------------------------------------------------------- helpers


def _file_sha256(path: Optional[str]) -> Optional[str]:
    from ..persistence import file_sha256

    return file_sha256(path) if path and Path(path).is_file() else None


def _requests_fingerprint(requests: Sequence[dict]) -> str:
    blob = json.dumps(list(requests), sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()


def select_requests(requests: Sequence[dict], num_edits: Optional[int], offset: int = 0
                    ) -> List[dict]:
    """``requests[offset:offset + num_edits]``, with a clear error when there are too few."""
    if offset < 0:
        raise ValueError("--offset must be >= 0")
    available = len(requests) - offset
    n = available if num_edits is None else num_edits
    if n <= 0:
        raise ValueError(f"no edits selected: the data has {len(requests)} usable records, "
                         f"offset {offset}")
    if n > available:
        raise ValueError(f"--num-edits {n} needs {n + offset} records; the data has "
                         f"{len(requests)} usable records")
    return list(requests[offset:offset + n])


def write_testbed_corpus(directory: os.PathLike) -> Path:
    """Write the testbed world's training text (one sentence a line) under ``directory``
    and return the file: ROME/MEMIT's second-moment statistics for the testbed model."""
    from .. import testbed

    world = testbed.load_world() if hasattr(testbed, "load_world") else None
    if world is None:
        raise RuntimeError("the embedded testbed has no world in this checkout "
                           "(lemoe_easyedit.testbed.load_world is missing)")
    texts = world.training_text()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:10]
    path = directory / f"testbed-world-{digest}.txt"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(texts) + "\n", encoding="utf-8")
        tmp.replace(path)
    return path


def prepare_hparams(method: str, hparams_path: str, args: argparse.Namespace):
    """Load the hparams and apply the command-line overrides and path resolution."""
    from .methods import load_hparams

    path = find_hparams_file(hparams_path, method)
    hp = load_hparams(method, str(path))
    if args.model is not None:
        hp.model_name = resolve_relative(args.model)
    else:
        hp.model_name = resolve_relative(hp.model_name, path)
    # "tiny-llama-realfact": the default realfact model, shipped or built on first use
    hp.model_name = realfact_integration.resolve_model_name(hp.model_name)
    if args.device is not None:
        dev = args.device
        hp.device = int(dev) if dev.lstrip("-").isdigit() else dev
    if getattr(args, "max_length", None) is not None:
        hp.max_length = args.max_length
    if hasattr(hp, "stats_dir"):
        if args.stats_dir is not None:
            hp.stats_dir = args.stats_dir
        hp.stats_dir = os.path.expandvars(os.path.expanduser(str(hp.stats_dir)))
    if hasattr(hp, "mom2_dataset"):
        if args.mom2_dataset is not None:
            hp.mom2_dataset = args.mom2_dataset
        if hp.mom2_dataset == TESTBED_CORPUS:
            hp.mom2_dataset = str(write_testbed_corpus(Path(hp.stats_dir) / "corpus"))
        else:
            hp.mom2_dataset = resolve_relative(hp.mom2_dataset, path)
    return hp


# ----------------------------------------------------------------------- run


def _subject_aligned(requests: List[dict], hp) -> Tuple[List[dict], List[int]]:
    """``--subject-aligned``: drop (and name) the records the model's tokenizer misaligns."""
    import warnings

    from .data import subject_aligned
    from .models import load_tokenizer

    kept, dropped = subject_aligned(requests, load_tokenizer(hp))
    ids = [requests[i].get("case_id", i) for i in dropped]
    if ids:
        shown = ", ".join(map(str, ids[:20]))
        more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
        warnings.warn(f"--subject-aligned: left out {len(ids)} record(s) whose subject "
                      f"does not end on a token boundary of the prompt (case_id {shown}{more})")
    return kept, ids


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Do what ``run`` does and return the results dict (also written to ``--out``)."""
    import torch

    from . import data as data_mod
    from .probes import with_same_subject_probes
    from .protocol import run_protocol
    from .report import summary_table

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = args.data_path
    if path is not None and args.data != "testbed":
        path = resolve_relative(path, must_exist=True)
    all_requests = data_mod.load_dataset(args.data, path, skip_malformed=args.skip_malformed)
    hp = prepare_hparams(args.method, args.hparams, args)
    # A realfact build: every record it was built on is a fact it ends with its end token.
    realfact = realfact_integration.is_realfact_dir(hp.model_name)
    known_info = None
    if getattr(args, "known", "auto") == "on" or (
            getattr(args, "known", "auto") == "auto"
            and realfact):
        all_requests, known_info = realfact_integration.filter_known(all_requests,
                                                                     hp.model_name)
        print(realfact_integration.describe(known_info), file=sys.stderr)
    end_token = getattr(args, "end_token", "auto")
    edit_end_token = end_token == "on" or (
        end_token == "auto" and realfact)
    misaligned: List[int] = []
    if args.subject_aligned:
        all_requests, misaligned = _subject_aligned(all_requests, hp)
    probes_missing = None
    if getattr(args, "same_subject_probes", False):
        all_requests, probes_missing = with_same_subject_probes(all_requests)
    requests = select_requests(all_requests, args.num_edits, args.offset)
    metric = args.eval_metric
    if metric == "auto":
        metric = "ppl" if args.data == "hallucination" else "token_em"
    if args.data == "testbed" and path is None:
        from .. import testbed

        path_label = f"testbed edit set {getattr(testbed, 'DEFAULT_EDIT_SET', 'default')}"
    else:
        path_label = str(path) if path else None
    data_info = {
        "name": args.data, "path": path_label,
        "sha256": _file_sha256(path), "usable_records": len(all_requests),
        "offset": args.offset, "num_edits": len(requests),
        "requests_sha256": _requests_fingerprint(requests),
    }
    if args.subject_aligned:
        data_info["subject_misaligned_dropped"] = misaligned
    if known_info is not None:
        data_info["known_filter"] = known_info
    if probes_missing is not None:
        data_info["same_subject_probes"] = {"records_without_one": probes_missing}
    with open(out / "edit.log", "w", encoding="utf-8") as log:
        results = run_protocol(args.method, hp, requests, chunk_size=args.chunk,
                               checkpoint_every=args.checkpoints, eval_metric=metric,
                               greedy=not args.no_greedy, seed=args.seed,
                               restore=args.restore, progress=not args.no_progress,
                               quiet=True, log=log, data_info=data_info,
                               edit_end_token=edit_end_token)
    results["hparams_file"] = str(args.hparams)
    results["command"] = [sys.executable, "-m", "lemoe_easyedit.evaluation.runner"] + list(
        getattr(args, "_argv", []) or [])
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    (out / "summary.md").write_text(
        f"# {args.method} on {args.data}\n\n{summary_table([results])}\n\n"
        f"Scoring: {results['scoring']}.\n", encoding="utf-8")
    return results


def run_command(args: argparse.Namespace) -> int:
    """``run`` subcommand: returns the exit status."""
    from .report import summary_table

    results = run(args)
    print(summary_table([results]))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


# ----------------------------------------------------------------------- compare


def _method_hparams(spec: str, args: argparse.Namespace) -> Tuple[str, str]:
    if "=" in spec:
        method, path = spec.split("=", 1)
        return method, path
    name = args.hparams_name or DEFAULT_HPARAMS_NAME.get(args.data)
    if name is None:
        raise ValueError(f"--hparams-name is needed for --data {args.data} (e.g. llama-7b), "
                         f"or give METHOD=path.yaml")
    path = Path(args.hparams_dir) / spec / f"{name}.yaml"
    return spec, str(path)


def _forwarded_flags(args: argparse.Namespace) -> List[str]:
    flags = ["--data", args.data]
    for name in ("data_path", "num_edits", "offset", "chunk", "checkpoints", "eval_metric",
                 "seed", "restore", "model", "device", "max_length", "stats_dir", "mom2_dataset",
                 "threads", "known", "end_token"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    for name in ("no_greedy", "skip_malformed", "subject_aligned", "same_subject_probes",
                 "no_progress"):
        if getattr(args, name):
            flags.append("--" + name.replace("_", "-"))
    return flags


def _subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    root = str(PACKAGE_PARENT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _reusable(res_file: Path, cmd: List[str], method: str, hp_path: str,
              args: argparse.Namespace) -> Optional[dict]:
    """``res_file``'s results when ``run`` made them with ``cmd``'s arguments and the
    hparams ``hp_path`` gives now (after the same overrides); else None."""
    from .provenance import _hparams_dict

    if not res_file.exists():
        return None
    res = json.loads(res_file.read_text())
    if res.get("command", [])[1:] != cmd[1:]:
        return None
    if res.get("hparams") != _hparams_dict(prepare_hparams(method, hp_path, args)):
        return None
    return res


def compare(args: argparse.Namespace) -> Dict[str, Any]:
    """Run every method in its own process; write and return the combined table."""
    from .report import summary_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for spec in args.methods:
        method, hp_path = _method_hparams(spec, args)
        method_out = out / method
        method_out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lemoe_easyedit.evaluation.runner", "run",
               "--method", method,
               "--hparams", hp_path, "--out", str(method_out)] + _forwarded_flags(args)
        t0 = time.time()
        status, error = "ok", None
        res_file = method_out / "results.json"
        kept = _reusable(res_file, cmd, method, hp_path, args) if args.reuse else None
        if kept is not None:
            print(f"[compare] {method}: reusing {res_file}", file=sys.stderr)
            results.append(kept)
            rows.append(_row(method, "reused", hp_path, cmd, kept["timings"].get("total_s"),
                             kept, res_file))
            continue
        with open(method_out / "process.log", "w", encoding="utf-8") as plog:
            try:
                proc = subprocess.run(cmd, stdout=plog, stderr=subprocess.STDOUT,
                                      env=_subprocess_env(), timeout=args.timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code, status = None, "timeout"
        wall = time.time() - t0
        if code != 0 or not res_file.exists():
            status = status if status == "timeout" else "failed"
            tail = (method_out / "process.log").read_text(errors="replace")[-2000:]
            error = f"exit status {code}; last output:\n{tail}"
            print(f"[compare] {method} {status}: see {method_out / 'process.log'}",
                  file=sys.stderr)
            rows.append({"method": method, "status": status, "hparams": hp_path,
                         "command": cmd, "wall_s": wall, "error": error})
            continue
        res = json.loads(res_file.read_text())
        results.append(res)
        rows.append(_row(method, status, hp_path, cmd, wall, res, res_file))
    fingerprints = {r.get("requests_sha256") for r in rows if r.get("requests_sha256")}
    if len(fingerprints) > 1:  # pragma: no cover - would be a bug
        raise RuntimeError(f"methods were not given the same edits: {fingerprints}")
    combined = {
        "data": results[0]["data"] if results else {"name": args.data},
        "methods": [r["method"] for r in rows],
        "rows": rows,
        "versions": results[0]["versions"] if results else {},
        "seed": args.seed,
        "protocol": {k: v for k, v in (results[0]["protocol"] if results else {}).items()
                     if k not in ("edit_mode", "batch_size", "edit_calls")},
        "argv": list(getattr(args, "_argv", []) or []),
    }
    table = summary_table(results)
    failed = [r for r in rows if r["status"] not in ("ok", "reused")]
    lines = [f"# Lifelong editing on {args.data}", "", table, ""]
    if failed:
        lines += ["Failed: " + ", ".join(f"{r['method']} ({r['status']})" for r in failed), ""]
    if results:
        lines += [f"Scoring: {results[0]['scoring']}.", "",
                  f"Protocol: {results[0]['protocol']['version']}; "
                  f"{results[0]['protocol']['num_edits']} edits in chunks of "
                  f"T={results[0]['protocol']['chunk_size']}.", ""]
        for r in rows:
            if r["status"] in ("ok", "reused"):
                p = r["protocol"]
                lines.append(f"- {r['method']}: {p['edit_mode']} editing "
                             f"({len(p['edit_calls'])} calls per chunk), hparams "
                             f"`{r['hparams']}`, {r['implementation']}")
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if results:
        p0 = results[0]["protocol"]
        from .report import plot_curves

        plot_curves(results, out / "compare.png",
                    title=f"{args.data}: T={p0['chunk_size']}, {p0['n_chunks']} chunk(s), "
                          f"scored after every edit so far")
        combined["plot"] = str(out / "compare.png")
    with open(out / "compare.json", "w", encoding="utf-8") as f:
        json.dump(combined, f, indent=1)
    combined["table"] = table
    return combined


def _row(method: str, status: str, hp_path: str, cmd: List[str], wall: Optional[float],
         res: dict, res_file: Path) -> Dict[str, Any]:
    """One method's row of ``compare.json``."""
    return {"method": method, "status": status, "hparams": hp_path, "command": cmd,
            "wall_s": wall, "implementation": res.get("implementation"),
            "scoring": res.get("scoring"), "summary": res.get("summary"),
            "checkpoints": res.get("checkpoints"), "timings": res.get("timings"),
            "protocol": res.get("protocol"), "results": str(res_file),
            "requests_sha256": res.get("data", {}).get("requests_sha256")}


def compare_command(args: argparse.Namespace) -> int:
    """``compare`` subcommand: 0 when every method ran, 1 otherwise."""
    combined = compare(args)
    print(combined["table"])
    print(f"table: {Path(args.out) / 'compare.md'}  json: {Path(args.out) / 'compare.json'}")
    return 0 if all(r["status"] in ("ok", "reused") for r in combined["rows"]) else 1


# ----------------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lemoe_easyedit.evaluation.runner",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="one method under the lifelong protocol"))
    add_compare_arguments(sub.add_parser("compare", help="several methods, one table"))
    args = parser.parse_args(argv)
    args._argv = argv
    if args.command == "run":
        return run_command(args)
    return compare_command(args)


if __name__ == "__main__":
    sys.exit(main())
