"""Performance benchmark: editing cost, serving cost and memory of LEMoE against baselines.

::

    python benchmarks/bench.py --out bench-results            # the testbed, full size
    python benchmarks/bench.py --model PATH --out DIR         # any supported causal LM
    lemoe-easyedit bench --help

One run, on one model and one list of edits, measures

* **editing cost**: seconds per edit and edits per second of LEMoE, ROME, MEMIT, GRACE and FT
  (each method in its own subprocess, edits given as the evaluation protocol gives them:
  LEMoE all T edits in calls of its ``batch_size``, the others one edit per call unless
  batchable with ``batch_size > 1``), their ratio to LEMoE's, each process's peak resident
  memory and its resident memory above the loaded model after editing. LEMoE's figure is
  at ``T = max(--stream)``; GRACE is timed over ``--grace-edits`` (default the same T),
  ROME, MEMIT and FT over ``--baseline-edits`` (their cost per edit does not grow). Each
  time is the fastest of ``--rounds`` rounds: later rounds time every method's editing
  again, one method after the other, so that a slow spell of a shared machine (minutes
  long on this project's CI machine) does not land on one method alone;
* **growth of LEMoE's cost with the stream**: the time per edit of each ``T`` in
  ``--stream`` (protocol mode, fresh model each; a shorter ``T`` on each of the ``T``-edit
  blocks of the longest stream, so that every ``T`` edits the same facts, the longest run
  halfway through those blocks; each ``T``'s fastest round), and the marginal time per edit
  over the ``--window`` edits before each ``T`` when the stream arrives in installments of
  ``--edits-per-expert`` edits (one call, one expert each; each window's fastest round);
* **serving cost**: when the installments have made 1, 5, 20, 100 (``--experts``) experts,
  the forward latency (one prompt at a time, and one padded batch) and the greedy
  generation throughput of the edited model relative to the unedited one, interleaved in
  the same process (the adaptor is swapped out and back in between timings);
* **memory after editing**: resident memory and live tensor bytes above the loaded model
  after the installments, against the bytes of the experts (expert, routing projection,
  key, anchors, flag). The baseline is the loaded model with a runtime that has already
  run this stream once (its edits made and taken out again): the runtime's own pools grow
  with the shapes it meets (MKL keeps a buffer for every new GEMM shape, base model or
  not), and they are the run's, not the edited model's. The figures from the cold baseline
  (one warm-up call) are reported beside them;
* **cached-activation training**: the same expert batches trained with
  ``cached_activations`` true and false from the same state: time ratio, and the largest
  difference of per-step losses and of final weights.

Figures go to ``OUT/bench.json`` and ``OUT/bench.md``; each subprocess's output to
``OUT/logs``. The testbed (``lemoe_easyedit/testbed_assets``) is the default model, with
its edit set and ``hparams/<METHOD>/testbed-llama.yaml`` where those exist; any other model
gets hyper-parameters written from the model-family table (``OUT/hparams``) and synthetic
edits unless ``--data-path`` gives a JSON list of requests. Without the testbed a tiny
within one run.
"""

from .cli import add_arguments, bench_command, main
from .report import markdown
from .run import TARGETS, run_bench

__all__ = ["add_arguments", "bench_command", "main", "run_bench", "markdown", "TARGETS"]
