"""One bench run: every worker spawned in its own process, rounds, targets."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .inputs import (METHODS, REPO_ROOT, TESTBED_HPARAMS, _corpus_lines, _generated_hparams,
                     _grace_available, _synthetic_requests, _testbed_path)
from .report import markdown
from .workers import _fastest_round

# ----------------------------------------------------------------------- the run


#: (key, description, how to read it)
TARGETS = (
    ("throughput_vs_grace", "LEMoE editing throughput >= 10x GRACE's at T=max", 10.0),
    ("throughput_vs_rome", "LEMoE editing throughput >= 3x ROME's at T=max", 3.0),
    ("cached_speedup", "cached-activation training >= 2x faster than full forward", 2.0),
    ("latency_5", "forward latency within 10% of base with 5 experts", 1.10),
    ("latency_100", "forward latency within 25% of base with 100 experts", 1.25),
    ("stream_growth", "time per edit at T=max within 20% of that at T=min "
                      "(protocol mode, fresh model each)", 1.20),
    ("marginal_growth", "marginal time per edit at T=max within 20% of that at T=min "
                        "(installments)", 1.20),
    ("memory", "RSS above the loaded model (warm runtime) = experts' bytes within 10%",
     0.10),
    ("anon_memory", "anonymous RSS (no shared-library pages) above the loaded model (warm "
                    "runtime) = experts' bytes within 10%", 0.10),
    ("memory_growth", "RSS growth after the first call = bytes of the experts added, "
                      "within 10%", 0.10),
    ("anon_growth", "anonymous RSS growth (no shared-library pages) after the first call = "
                    "bytes of the experts added, within 10%", 0.10),
    ("tensor_growth", "live tensor bytes above the loaded model = experts' bytes "
                      "(+ routing table) within 10%", 0.10),
)


def _growth(per_edit: dict) -> Optional[float]:
    ts = sorted(int(t) for t, v in (per_edit or {}).items() if v)
    return per_edit[str(ts[-1])] / per_edit[str(ts[0])] if len(ts) >= 2 else None


def _evaluate_targets(res: dict) -> List[dict]:
    out = []
    methods, le = res["methods"], res["methods"].get("LEMoE", {})
    ok = le.get("status") == "ok"
    inst = le.get("installments", {}) if ok else {}
    serving = {s["experts"]: s for s in inst.get("serving", [])}
    training = res.get("training", {})
    for key, text, bound in TARGETS:
        value, met, band = None, None, False
        if key.startswith("throughput_vs_"):
            other = methods.get(key.split("_")[-1].upper(), {})
            if other.get("status") == "ok" and ok:
                value = other["seconds_per_edit"] / le["seconds_per_edit"]
                met = value >= bound
        elif key == "cached_speedup" and training.get("status") == "ok":
            value = training["speedup"]
            met = value >= bound and training["max_rel_loss_diff"] <= 1e-4
        elif key.startswith("latency_"):
            s = serving.get(int(key.split("_")[1]))
            if s:
                value = s["forward_ratio"]
                met = value <= bound
        elif key == "stream_growth" and ok:
            value = _growth(le["seconds_per_edit_at"])
        elif key == "marginal_growth" and ok:
            value = _growth(inst["seconds_per_edit_at"])
        elif key == "memory" and ok and inst["expert_bytes"]:
            value, band = inst["rss_above_base_bytes"] / inst["expert_bytes"], True
        elif key == "anon_memory" and ok and inst["expert_bytes"] and \
                inst.get("anon_above_base_bytes") is not None:
            value, band = inst["anon_above_base_bytes"] / inst["expert_bytes"], True
        elif key == "memory_growth" and ok and inst["expert_bytes_after_first"]:
            value = inst["rss_growth_after_first_bytes"] / inst["expert_bytes_after_first"]
            band = True
        elif key == "anon_growth" and ok and inst["expert_bytes_after_first"] and \
                inst.get("anon_growth_after_first_bytes") is not None:
            value = inst["anon_growth_after_first_bytes"] / inst["expert_bytes_after_first"]
            band = True
        elif key == "tensor_growth" and ok and inst["expert_bytes"]:
            value, band = inst["tensor_bytes_above_base"] / inst["expert_bytes"], True
        if key.endswith("growth") and not band and value is not None:
            met = value <= bound
        if band:
            met = abs(value - 1.0) <= bound
        out.append({"target": key, "description": text, "value": value, "met": met})
    return out


def _subprocess_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    # The workers import this harness (benchmarks/) and the package of this checkout.
    paths = [str(REPO_ROOT / "benchmarks"), str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                 else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _spawn(name: str, job: dict, out: Path, timeout: int) -> dict:
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = dict(job, result=str(jobs / f"{name}.result.json"))
    path = jobs / f"{name}.json"
    path.write_text(json.dumps(job, indent=1))
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, "-m", "lemoe_bench", "--worker", str(path)],
                           stdout=f, stderr=subprocess.STDOUT, cwd=str(out),
                           env=_subprocess_env(job["threads"]), timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout} s (see {log})"}
    result_file = Path(job["result"])
    if not result_file.exists():
        return {"status": "error", "error": f"worker died without a result (see {log})"}
    result = json.loads(result_file.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def run_bench(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark; returns the results (also written to ``--out``)."""
    import torch
    import transformers

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stream = sorted(set(args.stream))
    T = stream[-1]
    window = max(1, min(args.window, stream[0]))
    grace_edits = args.grace_edits or T
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    need = max(T, args.baseline_edits, grace_edits, args.train_edits) + 1

    testbed = _testbed_path() if args.model is None else None
    if args.model is not None:
        model_path, source = str(Path(args.model).resolve()) if Path(args.model).exists() \
            else args.model, "given"
    elif testbed is not None:
        model_path, source = str(testbed), "testbed"
    else:
        from lemoe_easyedit.testing import build_tiny_model

        reqs = _synthetic_requests(need, args.seed)
        model_path = str(build_tiny_model("llama", out / "model", texts=_corpus_lines(reqs),
                                          hidden=128, intermediate=512, layers=4))
        source = "built (testbed absent)"

    if args.data_path:
        requests = json.loads(Path(args.data_path).read_text())
        data = f"file {args.data_path}"
    elif source == "testbed":
        from lemoe_easyedit.testbed import testbed_edit_set, to_requests

        requests = to_requests(testbed_edit_set(need, seed=args.seed))
        data = "testbed edit set"
    else:
        requests = _synthetic_requests(need, args.seed)
        data = "synthetic"
    if len(requests) < need:
        raise ValueError(f"the benchmark needs {need} requests, the data has {len(requests)}")
    requests = requests[:need]
    req_file = out / "requests.json"
    req_file.write_text(json.dumps(requests))

    stats_dir = out / "stats"
    if source == "testbed":
        from lemoe_easyedit.evaluation.runner import write_testbed_corpus

        corpus = str(write_testbed_corpus(stats_dir / "corpus"))
    else:
        corpus_file = stats_dir / "corpus.txt"
        corpus_file.parent.mkdir(parents=True, exist_ok=True)
        corpus_file.write_text("\n".join(_corpus_lines(requests)) + "\n")
        corpus = str(corpus_file)

    name = args.hparams_name or (TESTBED_HPARAMS if source == "testbed" else None)
    methods = ["LEMoE"] + [m for m in args.methods if m != "LEMoE" and m in METHODS]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    hp_files, hp_origin = {}, {}
    for m in methods:
        shipped = REPO_ROOT / "hparams" / m / f"{name}.yaml" if name else None
        if shipped is not None and shipped.is_file():
            hp_files[m], hp_origin[m] = str(shipped), str(shipped.relative_to(REPO_ROOT))
        else:
            import yaml

            cfg = _generated_hparams(m, model_path, str(stats_dir), corpus)
            path = out / "hparams" / f"{m}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            hp_files[m], hp_origin[m] = str(path), "generated"

    base_job = dict(model=model_path, requests=str(req_file), stats_dir=str(stats_dir),
                    corpus=corpus, threads=args.threads, seed=args.seed,
                    edits_per_expert=args.edits_per_expert)
    results: Dict[str, Any] = {}
    jobs = {"LEMoE": dict(
        base_job, kind="lemoe", method="LEMoE", hparams=hp_files["LEMoE"], stream=stream,
        window=window, experts=args.experts, latency_prompts=args.latency_prompts,
        gen_tokens=args.gen_tokens, repeats=args.repeats)}
    for m in methods[1:]:
        if m == "GRACE" and not _grace_available():
            results[m] = {"status": "n/a", "error": "GRACE is not registered"}
            continue
        jobs[m] = dict(base_job, kind="baseline", method=m, hparams=hp_files[m],
                       edits=grace_edits if m == "GRACE" else args.baseline_edits)
    for m, job in jobs.items():
        results[m] = _spawn(m, job, out, args.timeout)
    for m in METHODS:
        if m not in results:
            results[m] = {"status": "n/a", "error": "not requested"}
    training = _spawn("training", dict(base_job, kind="training", method="LEMoE",
                                       hparams=hp_files["LEMoE"], train_edits=args.train_edits),
                      out, args.timeout)
    # Later rounds: every method's editing once more, round after round (not one method's
    # repeats back to back), so that a slow spell of the machine reaches all methods alike.
    later: Dict[str, List[dict]] = {m: [] for m in jobs}
    for n in range(2, args.rounds + 1):
        for m, job in jobs.items():
            if results[m].get("status") == "ok":
                later[m].append(_spawn(f"{m}.round{n}", dict(job, timing_only=True), out,
                                       args.timeout))
    for m, rounds in later.items():
        if rounds:
            results[m] = _fastest_round(results[m], rounds)

    lemoe = results["LEMoE"]
    lemoe_spe = lemoe.get("seconds_per_edit")
    for m, r in results.items():
        if r.get("status") == "ok" and lemoe_spe:
            r["time_ratio_to_lemoe"] = r["seconds_per_edit"] / lemoe_spe
    res = {
        "settings": {
            "model": model_path, "model_source": source, "data": data,
            "hparams": hp_origin, "threads": args.threads, "seed": args.seed,
            "stream": stream, "window": window, "edits_per_expert": args.edits_per_expert,
            "experts": args.experts, "baseline_edits": args.baseline_edits,
            "grace_edits": grace_edits,
            "train_edits": args.train_edits, "latency_prompts": args.latency_prompts,
            "gen_tokens": args.gen_tokens, "repeats": args.repeats, "rounds": args.rounds,
            "command": getattr(args, "_command", None),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__},
        },
        "methods": results,
        "training": training,
    }
    res["targets"] = _evaluate_targets(res)
    res["settings"]["wall_seconds"] = time.perf_counter() - t_start
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    (out / "bench.md").write_text(markdown(res))
    return res


