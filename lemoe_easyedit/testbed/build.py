"""Build the testbed from scratch: world -> tokenizer -> pretrained tiny LLaMA -> directory.

::

    python -m lemoe_easyedit.testbed.build --out DIR --seed 0

writes ``DIR`` (normally ``.../tiny-llama-factworld``) with ``model.safetensors``,
``config.json``, ``generation_config.json``, the tokenizer files, ``world.json`` and
``build_info.json`` (seed, command, world size, training steps, time and the measured fact
accuracy per template). Deterministic under the seed on a given machine and thread count.

Training: every fact (and every landmark fact, for locality) in every template is one
sequence ``<s> prompt object </s>``; the loss is cross-entropy on the object tokens and the
``</s>`` after them only (logits are computed only there, which is most of the speed-up on
CPU). AdamW with linear warm-up and cosine decay, shuffled with a seeded generator.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .metrics import template_accuracy
from .model import ModelSpec, count_parameters, create_model
from .tokenizer import build_tokenizer
from .world import World

__all__ = ["TrainSpec", "BuildResult", "build_testbed", "train_model", "encode_training",
           "training_examples",
           "main", "DEFAULT_WORLD", "DEFAULT_MODEL", "DEFAULT_TRAIN"]


@dataclass
class TrainSpec:
    """Optimisation settings of the pretraining run."""

    epochs: float = 12.0
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.02
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    #: landmark facts have half as many templates as people facts: repeat their sentences
    #: so every fact is seen about as often
    locality_repeat: int = 2
    #: 1 by default: batches of 32 short sequences through 64-wide matrices gain nothing
    #: from intra-op threads (2 threads measured slower on 2 cores), and one thread keeps
    #: the run fast when other work shares the CPU and bit-identical between machines
    num_threads: Optional[int] = 1

    def to_dict(self) -> dict:
        return asdict(self)


#: The shipped testbed's settings (``build_testbed`` defaults).
DEFAULT_WORLD: Dict[str, int] = dict(n_entities=320, n_relations=12, n_objects=30,
                                     n_landmarks=150, n_landmark_relations=3,
                                     n_landmark_objects=20)
DEFAULT_MODEL = ModelSpec()
DEFAULT_TRAIN = TrainSpec()


@dataclass
class BuildResult:
    path: Path
    info: dict
    model: object = None
    tokenizer: object = None
    world: Optional[World] = None


def encode_training(tok, examples: Sequence[Tuple[str, str]]):
    """Pad ``<s> prompt object </s>`` sequences on the right.

    Returns ``(input_ids [N, L], loss_mask [N, L], lengths [N])``; ``loss_mask`` is true at
    the object tokens and the final ``</s>`` (the positions whose token is predicted).
    """
    prompts = [p for p, _ in examples]
    fulls = [p + " " + o for p, o in examples]
    p_ids = tok(prompts)["input_ids"]
    f_ids = tok(fulls)["input_ids"]
    width = max(len(f) for f in f_ids) + 1
    n = len(examples)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (f, p) in enumerate(zip(f_ids, p_ids)):
        seq = f + [tok.eos_token_id]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, len(p):len(seq)] = True
        lengths[i] = len(seq)
    return ids, mask, lengths


def training_examples(world: World, locality_repeat: int = 2) -> List[Tuple[str, str]]:
    """People facts in every template, then landmark facts in every template, repeated."""
    people = world.training_examples(include_locality=False)
    landmarks = [(p, o) for f, t, p in world.iter_prompts(world.locality_facts) for o in [f.object]]
    return people + landmarks * max(1, locality_repeat)


def _epoch_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator,
                   sort_window: int = 16) -> List[torch.Tensor]:
    """One epoch of shuffled batches (popped from the end).

    Sequences are shuffled, then sorted by length inside windows of ``sort_window`` batches
    so that a batch holds sequences of similar length (little padding), and the batch order
    is shuffled again.
    """
    n = lengths.shape[0]
    order = torch.randperm(n, generator=gen)
    window = batch_size * sort_window
    batches = []
    for start in range(0, n, window):
        chunk = order[start:start + window]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _lr_at(step: int, total: int, spec: TrainSpec) -> float:
    warm = max(1, int(total * spec.warmup_frac))
    if step < warm:
        return spec.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cos)


def train_model(model, tok, examples: Sequence[Tuple[str, str]], spec: TrainSpec,
                seed: int = 0, progress: bool = True, log_every: int = 0,
                callback=None, callback_every: int = 0) -> dict:
    """Pretrain ``model`` in place on ``examples`` (``(prompt, object)`` pairs).

    ``callback(step, model)`` is called every ``callback_every`` steps (model in eval mode,
    put back in train mode afterwards).
    """
    from tqdm.auto import tqdm

    ids, loss_mask, lengths = encode_training(tok, examples)
    n = ids.shape[0]
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total = max(1, int(round(spec.epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=spec.betas, eps=1e-8)
    body, head = model.model, model.lm_head
    model.train()
    t0 = time.time()
    tokens_seen, loss_ema = 0, None
    bar = tqdm(total=total, desc="pretraining", disable=not progress, mininterval=1.0)
    history = []
    batches: List[torch.Tensor] = []
    for step in range(total):
        if not batches:
            batches = _epoch_batches(lengths, spec.batch_size, gen)
        idx = batches.pop()
        width = int(lengths[idx].max())
        x = ids[idx, :width]
        m = loss_mask[idx, :width]
        # Right padding + causal attention: real tokens never see the pads, no mask needed.
        hidden = body(input_ids=x).last_hidden_state
        h = hidden[:, :-1][m[:, 1:]]
        y = x[:, 1:][m[:, 1:]]
        loss = torch.nn.functional.cross_entropy(head(h), y)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, spec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        tokens_seen += int(lengths[idx].sum())
        lv = loss.item()
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        if step % 10 == 0 or step == total - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{_lr_at(step, total, spec):.1e}",
                            refresh=False)
        if log_every and (step % log_every == 0 or step == total - 1):
            history.append({"step": step, "loss": round(loss_ema, 4),
                            "time_s": round(time.time() - t0, 1)})
        bar.update(1)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
    bar.close()
    model.eval()
    elapsed = time.time() - t0
    return {
        "steps": total,
        "steps_per_epoch": steps_per_epoch,
        "epochs": spec.epochs,
        "sequences": n,
        "tokens_seen": tokens_seen,
        "train_time_s": round(elapsed, 1),
        "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9)),
        "final_loss_ema": round(loss_ema, 5) if loss_ema is not None else None,
        "history": history,
    }


def _round_acc(acc: Dict[int, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    return {str(t): {"token": round(v["token"], 4), "exact": round(v["exact"], 4),
                     "n": v["n"]} for t, v in acc.items()}


def build_testbed(out_dir, seed: int = 0, world_kwargs: Optional[dict] = None,
                  model_spec: Optional[ModelSpec] = None, train_spec: Optional[TrainSpec] = None,
                  progress: bool = True, evaluate: bool = True, save: bool = True,
                  command: Optional[str] = None) -> BuildResult:
    """Build world, tokenizer and pretrained model of ``seed`` into ``out_dir``.

    ``out_dir`` is the model directory itself; keep ``llama`` in its name so EasyEdit's
    ``BaseEditor`` picks the LLaMA classes. Returns a :class:`BuildResult` holding the
    trained model, tokenizer, world and the ``build_info`` dict (also written as
    ``build_info.json``).
    """
    t_start = time.time()
    world_kwargs = {**DEFAULT_WORLD, **(world_kwargs or {})}
    model_spec = model_spec or ModelSpec(**asdict(DEFAULT_MODEL))
    train_spec = train_spec or TrainSpec(**asdict(DEFAULT_TRAIN))
    threads = train_spec.num_threads or (os.cpu_count() or 1)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        world = World.generate(seed=seed, **world_kwargs)
        examples = training_examples(world, train_spec.locality_repeat)
        tok = build_tokenizer(p + " " + o for p, o in examples)
        model = create_model(model_spec, tok, seed=seed)
        n_params = count_parameters(model)
        if progress:
            print(f"[testbed] world {world.summary()}; vocab {len(tok)}; "
                  f"{n_params:,} parameters; {threads} threads", file=sys.stderr)
        torch.manual_seed(seed)
        train_info = train_model(model, tok, examples, train_spec, seed=seed, progress=progress,
                                 log_every=100)
        info = {
            "name": Path(out_dir).name,
            "seed": seed,
            "command": command or f"build_testbed({str(out_dir)!r}, seed={seed})",
            "world": {"params": world.params, "summary": world.summary(),
                      "fingerprint": world.fingerprint()},
            "tokenizer": {"type": "LlamaTokenizer (word-level BPE, metaspace)",
                          "vocab_size": len(tok)},
            "model": {"architecture": "LlamaForCausalLM", **model_spec.to_dict(),
                      "vocab_size": len(tok), "parameters": n_params, "dtype": "float32"},
            "training": {**train_spec.to_dict(), "num_threads": threads, **train_info},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": _version("transformers"),
                            "tokenizers": _version("tokenizers"),
                            "machine": platform.machine(), "cpu_count": os.cpu_count()},
        }
        if evaluate:
            t_eval = time.time()
            acc = template_accuracy(model, tok, world, batch_size=512)
            loc = template_accuracy(model, tok, world, facts=world.locality_facts, batch_size=512)
            info["accuracy"] = {
                "per_template": _round_acc(acc),
                "min_token": round(min(v["token"] for v in acc.values()), 4),
                "min_exact": round(min(v["exact"] for v in acc.values()), 4),
                "locality_per_template": _round_acc(loc),
                "eval_time_s": round(time.time() - t_eval, 1),
            }
            if progress:
                for t, v in acc.items():
                    print(f"[testbed] template {t}: token {v['token']:.4f} exact {v['exact']:.4f}",
                          file=sys.stderr)
                for t, v in loc.items():
                    print(f"[testbed] locality template {t}: token {v['token']:.4f} "
                          f"exact {v['exact']:.4f}", file=sys.stderr)
        info["build_time_s"] = round(time.time() - t_start, 1)
        out = Path(out_dir)
        if save:
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
            (out / "world.json").write_text(json.dumps(world.to_dict(), indent=1) + "\n")
            (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return BuildResult(out, info, model, tok, world)
    finally:
        torch.set_num_threads(prev_threads)


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # pragma: no cover
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lemoe_easyedit.testbed.build",
        description="Build the fact-world testbed (world, tokenizer, pretrained tiny LLaMA).")
    parser.add_argument("--out", required=True,
                        help="model directory to write (keep 'llama' in its name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=DEFAULT_WORLD["n_entities"])
    parser.add_argument("--relations", type=int, default=DEFAULT_WORLD["n_relations"])
    parser.add_argument("--objects", type=int, default=DEFAULT_WORLD["n_objects"],
                        help="objects per person relation")
    parser.add_argument("--landmarks", type=int, default=DEFAULT_WORLD["n_landmarks"])
    parser.add_argument("--epochs", type=float, default=DEFAULT_TRAIN.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN.batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULT_TRAIN.lr)
    parser.add_argument("--hidden", type=int, default=DEFAULT_MODEL.hidden_size)
    parser.add_argument("--layers", type=int, default=DEFAULT_MODEL.num_hidden_layers)
    parser.add_argument("--intermediate", type=int, default=DEFAULT_MODEL.intermediate_size)
    parser.add_argument("--threads", type=int, default=DEFAULT_TRAIN.num_threads,
                        help="torch threads (default 1, see TrainSpec.num_threads)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if "llama" not in Path(args.out).name.lower():
        print("warning: the directory name has no 'llama'; EasyEdit's BaseEditor will not "
              "recognise it", file=sys.stderr)
    spec = ModelSpec(**{**asdict(DEFAULT_MODEL), "hidden_size": args.hidden,
                        "num_hidden_layers": args.layers,
                        "intermediate_size": args.intermediate})
    train = TrainSpec(**{**asdict(DEFAULT_TRAIN), "epochs": args.epochs,
                         "batch_size": args.batch_size, "lr": args.lr,
                         "num_threads": args.threads})
    cmd = "python -m lemoe_easyedit.testbed.build " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    result = build_testbed(args.out, seed=args.seed,
                           world_kwargs={"n_entities": args.entities,
                                         "n_relations": args.relations,
                                         "n_objects": args.objects,
                                         "n_landmarks": args.landmarks},
                           model_spec=spec, train_spec=train, progress=not args.no_progress,
                           command=cmd)
    acc = result.info.get("accuracy", {})
    print(json.dumps({"out": str(result.path), "build_time_s": result.info["build_time_s"],
                      "parameters": result.info["model"]["parameters"],
                      "min_token": acc.get("min_token"), "min_exact": acc.get("min_exact")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
