"""Build a small LLaMA that knows the true facts of benchmark records.

::

    python -m lemoe_easyedit.realfact.build --out DIR [--records FILE[:N] ...]
        [--background FILE[:N] ...] [--epochs 40] [--lr 1.5e-3] [--vocab 6144] [--seed 0]

``--records`` are the files whose records will be edited (EasyEdit CounterFact or MEND
zsRE; ``FILE:N`` takes the first N records), ``--background`` further records learnt as
background knowledge (the default build uses them as held-out edits for tuning). Without
``--records`` the default build reads the shared benchmark files under ``--data-dir``
(default ``../shared/data`` beside the repository): the first 1,000 records of
``counterfact/counterfact-edit-1k.json``, ``zsre/zsre_mend_train-1k.json`` and the first
:data:`DEFAULT_BACKGROUND` records of ``counterfact/counterfact-train.json``.

Training text: each record's edit prompt, paraphrase and locality prompt, each followed by
``" " + true answer`` and ``</s>`` (loss on the answer and ``</s>`` only). A prompt that a
record earlier in the list already states with another answer is not trained again (the
first answer wins; ``build_info.json`` lists the conflicts). The counterfactual targets are
never stated as facts. The model does learn to *say* every object string (true answers and
counterfactual targets alike) in a copying prompt, ``Say <object> again:`` followed by the
object (``--say-objects N`` times an epoch, default 1; 0 leaves it out): a pretrained
model can say any word of its vocabulary, and a token the model never emits collapses onto
the others that it never emits, so no edit of hidden states (LEMoE, ROME, MEMIT, GRACE,
FT alike) can make it the argmax. zsRE's ``loc`` facts (NQ answers, long and all different)
are the slowest to learn, so fields can be repeated (``--repeat loc=2``).

Writes ``DIR`` (keep ``llama`` in its name: EasyEdit's ``BaseEditor`` picks the model class
by that substring) with the model (safetensors), the tokenizer, ``training_text.txt`` (the
model's training text, one fact a line: ROME/MEMIT compute their second-moment statistics
from it) and ``build_info.json`` (sources with SHA-256, settings, time, and the knowledge
report per file and field). Deterministic under ``--seed`` on a given machine and thread
count; the caller's global RNG is left as it was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..testbed.build import TrainSpec, train_model
from ..testbed.model import ModelSpec, count_parameters, create_model
from .knowledge import knowledge_report
from ..persistence import file_sha256
from .records import FactRecord, parse_spec, read_records
from .tokenizer import DEFAULT_VOCAB, build_tokenizer, concatenation_failures

__all__ = ["RealFactSpec", "DEFAULT_MODEL", "DEFAULT_BACKGROUND", "default_sources",
           "collect_training", "say_pairs", "SAY_PROMPT", "build_realfact", "main"]

#: Background CounterFact records of the default build (held-out edits for tuning). More
#: background costs training time and, measured by the prototype, zsRE locality.
DEFAULT_BACKGROUND = 300
#: The copying prompt that teaches the model to say an object string (``{}``: the object).
#: The object is followed by a space, so it is spelt with the same tokens as an answer.
SAY_PROMPT = "Say {} again:"
#: Shape of the default model: 1.8M parameters, 7.3 MB.
DEFAULT_MODEL = ModelSpec(hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=512,
                          max_position_embeddings=160, tie_word_embeddings=True)


@dataclass
class RealFactSpec:
    """Everything but the record files that determines a build."""

    seed: int = 0
    vocab_size: int = DEFAULT_VOCAB
    epochs: float = 40.0
    lr: float = 1.5e-3
    batch_size: int = 32
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    #: field name -> how many times its facts appear per epoch (default 1)
    repeat: Dict[str, int] = field(default_factory=lambda: {"loc": 2})
    #: how many times per epoch each object string is trained in :data:`SAY_PROMPT`
    #: (0: never; see the module docstring)
    say_objects: int = 1
    #: 1: tiny matrices gain nothing from a second thread, and one thread keeps the build
    #: bit-identical between runs
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def default_sources(data_dir: os.PathLike, background: int = DEFAULT_BACKGROUND
                    ) -> Tuple[List[str], List[str]]:
    """``(records, background)`` specs of the default build under ``data_dir``."""
    d = Path(data_dir)
    records = [f"{d / 'counterfact' / 'counterfact-edit-1k.json'}:1000",
               f"{d / 'zsre' / 'zsre_mend_train-1k.json'}:1000"]
    bg = [f"{d / 'counterfact' / 'counterfact-train.json'}:{background}"] if background else []
    return records, bg


def _read(specs: Sequence[str], role: str) -> Tuple[List[List[FactRecord]], List[dict]]:
    """Per spec: its facts and a description of the source (for ``build_info.json``)."""
    facts, sources = [], []
    for spec in specs:
        path, n = parse_spec(spec)
        got, skipped = read_records(path, limit=n)
        facts.append(got)
        sources.append({"role": role, "path": str(path), "name": Path(path).name,
                        "sha256": file_sha256(path), "records": n if n is not None else
                        len(got) + len(skipped), "facts_from": len(got),
                        "skipped_no_fact": skipped, "format": got[0].fmt if got else None})
    return facts, sources


def collect_training(facts: Sequence[FactRecord], repeat: Optional[Dict[str, int]] = None
                     ) -> Tuple[List[Tuple[str, str]], List[dict]]:
    """Training ``(prompt, answer)`` pairs of ``facts`` and the conflicts left out.

    A prompt stated twice with one answer is trained once; with another answer, the first
    wins and the later one is listed as a conflict (a record then cannot be known in that
    field: a model cannot give two answers to one prompt).
    """
    repeat = repeat or {}
    seen: Dict[str, str] = {}
    pairs: List[Tuple[str, str]] = []
    conflicts = []
    for f in facts:
        for name, (prompt, answer) in f.probes.items():
            if prompt in seen:
                if seen[prompt] != answer:
                    conflicts.append({"prompt": prompt, "kept": seen[prompt],
                                      "dropped": answer, "field": name,
                                      "source": Path(f.source).name, "case_id": f.case_id})
                continue
            seen[prompt] = answer
            pairs.extend([(prompt, answer)] * max(1, int(repeat.get(name, 1))))
    return pairs, conflicts


def say_pairs(facts: Sequence[FactRecord], times: int = 1) -> List[Tuple[str, str]]:
    """``(SAY_PROMPT with the object, object)`` for every distinct object string of
    ``facts`` (true answers and counterfactual targets), sorted, each ``times`` times."""
    objects = {a for f in facts for _, a in f.probes.values()}
    objects |= {f.new_target for f in facts if f.new_target}
    return [(SAY_PROMPT.format(o), o) for o in sorted(objects)] * max(0, int(times))


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # pragma: no cover
        return "unknown"


def build_realfact(out_dir: os.PathLike, records: Sequence[str],
                   background: Sequence[str] = (), spec: Optional[RealFactSpec] = None,
                   model_spec: Optional[ModelSpec] = None, progress: Optional[bool] = None,
                   save: bool = True, command: Optional[str] = None) -> dict:
    """Build tokenizer and model on the true facts of ``records`` and ``background``
    (``FILE`` or ``FILE:N`` specs) into ``out_dir``; return ``build_info`` (also written).

    ``progress`` (default: only when stderr is a terminal) shows a tqdm bar.
    """
    t_start = time.time()
    spec = spec or RealFactSpec()
    model_spec = model_spec or ModelSpec(**asdict(DEFAULT_MODEL))
    if progress is None:
        progress = sys.stderr.isatty()
    edit_parts, sources = _read(records, "records")
    bg_parts, bg_sources = _read(background, "background")
    edit_facts = [f for part in edit_parts for f in part]
    bg_facts = [f for part in bg_parts for f in part]
    facts = edit_facts + bg_facts
    if not edit_facts:
        raise ValueError("no record states a fact: give --records FILE[:N]")
    pairs, conflicts = collect_training(facts, spec.repeat)
    pairs += say_pairs(facts, spec.say_objects)
    # The tokenizer sees every true fact and every counterfactual target (so edits are
    # spelt with the same vocabulary), the model only the true facts.
    texts = [p + " " + a for f in facts for p, a in f.probes.values()]
    texts += [f.edit_prompt[0] + " " + f.new_target for f in facts if f.new_target]
    tok = build_tokenizer(texts, vocab_size=spec.vocab_size,
                          model_max_length=model_spec.max_position_embeddings)
    concat_bad = concatenation_failures(
        tok, [pair for f in facts for pair in f.probes.values()]
        + [(f.edit_prompt[0], f.new_target) for f in facts if f.new_target])
    n_steps_epoch = math.ceil(len(pairs) / spec.batch_size)
    total_steps = max(1, int(round(spec.epochs * n_steps_epoch)))
    train_spec = TrainSpec(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                           min_lr_ratio=spec.min_lr_ratio,
                           warmup_frac=min(1.0, spec.warmup_steps / total_steps),
                           weight_decay=0.0, betas=spec.betas, grad_clip=1.0,
                           locality_repeat=1, num_threads=spec.threads)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        # Model initialisation seeds torch's global RNG: do it in a forked RNG so the
        # caller's random state is untouched. Batches come from a seeded Generator.
        with torch.random.fork_rng(devices=[]):
            model = create_model(model_spec, tok, seed=spec.seed)
        n_params = count_parameters(model)
        if progress:
            print(f"[realfact] {len(edit_facts)} records + {len(bg_facts)} background; "
                  f"{len(pairs)} training sequences; vocab {len(tok)}; {n_params:,} "
                  f"parameters; {total_steps} steps", file=sys.stderr)
        train_info = train_model(model, tok, pairs, train_spec, seed=spec.seed,
                                 progress=progress, log_every=200)
        t_eval = time.time()
        knowledge = {}
        for src, part in zip(sources + bg_sources, edit_parts + bg_parts):
            rep = knowledge_report(model, tok, part)
            rep.pop("known_mask")
            key = src["name"] if src["name"] not in knowledge else f"{src['name']} ({src['role']})"
            knowledge[key] = rep
        eval_s = time.time() - t_eval
    finally:
        torch.set_num_threads(prev_threads)
    info = {
        "name": Path(out_dir).name,
        "command": command or f"build_realfact({str(out_dir)!r}, ...)",
        "sources": sources + bg_sources,
        "settings": spec.to_dict(),
        "training_sequences": len(pairs),
        "conflicts": conflicts,
        "tokenizer": {"type": "LlamaTokenizer (byte-fallback BPE, metaspace)",
                      "vocab_size": len(tok),
                      "concatenation_failures": [list(p) for p in concat_bad]},
        "model": {"architecture": "LlamaForCausalLM", **model_spec.to_dict(),
                  "vocab_size": len(tok), "parameters": n_params, "dtype": "float32"},
        "training": {k: v for k, v in train_info.items()},
        "knowledge": knowledge,
        "eval_time_s": round(eval_s, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": _version("transformers"),
                        "tokenizers": _version("tokenizers"),
                        "machine": platform.machine(), "cpu_count": os.cpu_count()},
    }
    info["build_time_s"] = round(time.time() - t_start, 1)
    if save:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        # One fact a line, in training order without repeats: the text ROME/MEMIT's
        # second-moment statistics are computed from (the model's own training text).
        seen = dict.fromkeys(p + " " + a for p, a in pairs)
        (out / "training_text.txt").write_text("\n".join(seen) + "\n", encoding="utf-8")
        (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
        info["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    info["_model"], info["_tokenizer"] = model, tok
    return info


def _parse_repeat(items: Sequence[str]) -> Dict[str, int]:
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise argparse.ArgumentTypeError(f"--repeat wants FIELD=N, got {item!r}")
        out[name] = int(n)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Command line of the build (see the module docstring)."""
    from . import default_data_dir

    d = RealFactSpec()
    parser = argparse.ArgumentParser(
        prog="python -m lemoe_easyedit.realfact.build",
        description="Train a small LLaMA and its tokenizer on the true facts of "
                    "EasyEdit CounterFact / zsRE records.")
    parser.add_argument("--out", required=True,
                        help="model directory to write (keep 'llama' in its name)")
    parser.add_argument("--records", action="append", default=None, metavar="FILE[:N]",
                        help="records to be edited (repeatable); default: the shared files")
    parser.add_argument("--background", action="append", default=None, metavar="FILE[:N]",
                        help="background records (repeatable); default with the shared "
                             f"files: the first {DEFAULT_BACKGROUND} of counterfact-train.json")
    parser.add_argument("--data-dir", default=None,
                        help="where the shared files are (default ../shared/data beside the "
                             "repository)")
    parser.add_argument("--background-count", type=int, default=DEFAULT_BACKGROUND,
                        help="background records of the default build")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--vocab", type=int, default=d.vocab_size)
    parser.add_argument("--repeat", nargs="*", default=None, metavar="FIELD=N",
                        help="repeat a field's facts per epoch (default: loc=2)")
    parser.add_argument("--say-objects", type=int, default=d.say_objects, metavar="N",
                        help="train each object string N times an epoch in the copying "
                             f"prompt {SAY_PROMPT.format('<object>')!r} (0: never)")
    parser.add_argument("--hidden", type=int, default=DEFAULT_MODEL.hidden_size)
    parser.add_argument("--layers", type=int, default=DEFAULT_MODEL.num_hidden_layers)
    parser.add_argument("--heads", type=int, default=DEFAULT_MODEL.num_attention_heads)
    parser.add_argument("--intermediate", type=int, default=DEFAULT_MODEL.intermediate_size)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if "llama" not in Path(args.out).name.lower():
        print("warning: the directory name has no 'llama'; EasyEdit's BaseEditor will not "
              "recognise it", file=sys.stderr)
    records, background = args.records, args.background
    if records is None:
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        if data_dir is None or not data_dir.is_dir():
            parser.error("no --records given and no shared data directory found "
                         "(give --data-dir or --records FILE[:N])")
        records, default_bg = default_sources(data_dir, args.background_count)
        background = default_bg if background is None else background
    spec = RealFactSpec(seed=args.seed, vocab_size=args.vocab, epochs=args.epochs,
                        lr=args.lr, batch_size=args.batch_size, threads=args.threads,
                        say_objects=args.say_objects,
                        repeat=d.repeat if args.repeat is None else _parse_repeat(args.repeat))
    model_spec = ModelSpec(**{**asdict(DEFAULT_MODEL), "hidden_size": args.hidden,
                              "num_hidden_layers": args.layers,
                              "num_attention_heads": args.heads,
                              "num_key_value_heads": args.heads,
                              "intermediate_size": args.intermediate})
    cmd = "python -m lemoe_easyedit.realfact.build " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    info = build_realfact(args.out, records, background or [], spec=spec,
                          model_spec=model_spec,
                          progress=False if args.no_progress else None, command=cmd)
    print(json.dumps({"out": str(args.out), "build_time_s": info["build_time_s"],
                      "parameters": info["model"]["parameters"],
                      "size_bytes": info.get("size_bytes"),
                      "knowledge": {k: {"known": v["known_records"], "of": v["records"],
                                        "fields": v["fields"]}
                                    for k, v in info["knowledge"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
