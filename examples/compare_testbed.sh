#!/usr/bin/env bash
# LEMoE against ROME, MEMIT, GRACE and FT on the embedded testbed, T = 1000, under the
# project's lifelong protocol (all 1000 edits applied, then every edit scored; Loc per probe
# kind: landmark, same relation, same subject). CPU is enough (tens of minutes per run):
#   OUT_DIR/final  the headline table: each method gets the 1000 edits as its YAML says;
#   OUT_DIR/curve  Rel/Gen/Loc after every 100 edits (a checkpoint cuts a batch method's
#                  stream into 100-edit installments, so its final row can differ; CURVE=0
#                  skips it);
#   OUT_DIR/T3000  the paper's long setting, LEMoE, GRACE and FT (ROME and MEMIT have
#                  collapsed by T=1000 and take an hour each here; T3000=0 skips it).
#
#   examples/compare_testbed.sh [OUT_DIR]
#
# Each run writes compare.md, compare.json, compare.png and one results.json per method.
# The last 50 edits of the testbed set were used to tune the baselines
# (examples/sweep_baselines.py) and are not part of these 1000.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/testbed-T1000}"
PYTHON="${PYTHON:-python}"
common=(--methods LEMoE ROME MEMIT GRACE FT
        --hparams-dir hparams --hparams-name testbed-llama
        --data testbed --num-edits 1000 --chunk 1000
        --stats-dir "${STATS_DIR:-results/stats}" --seed 0 --threads 1)
"$PYTHON" -m lemoe_easyedit.cli compare "${common[@]}" --out "$OUT/final"
if [[ "${CURVE:-1}" == 1 ]]; then
  "$PYTHON" -m lemoe_easyedit.cli compare "${common[@]}" --checkpoints 100 --out "$OUT/curve"
fi
if [[ "${T3000:-1}" == 1 ]]; then
  "$PYTHON" -m lemoe_easyedit.cli compare --methods LEMoE GRACE FT \
    --hparams-dir hparams --hparams-name testbed-llama --data testbed \
    --num-edits 3000 --chunk 3000 --seed 0 --threads 1 --out "$OUT/T3000"
fi
