#!/usr/bin/env bash
# LEMoE against ROME, MEMIT, GRACE and FT on the public zsRE-1k and CounterFact-1k files, with
# the embedded testbed model, T = 100 (nine chunks of 100 edits, each from the unedited
# model, averaged). CPU is enough (about an hour in all).
#
#   examples/compare_shared_testbed.sh [OUT_DIR] [DATA_DIR]
#
# DATA_DIR holds zsre/zsre_mend_train-1k.json and counterfact/counterfact-edit-1k.json
# (default ../shared/data). --subject-aligned leaves out, for every method alike, the records
# whose subject the testbed tokenizer merges with the next characters (36 of zsRE's, 42 of
# CounterFact's): EasyEdit's ROME and MEMIT would index their subject wrongly or stop.
# --skip-malformed leaves out zsRE's two records with an empty target.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/shared-testbed-T100}"
DATA="${2:-../shared/data}"
PYTHON="${PYTHON:-python}"
common=(--methods LEMoE ROME MEMIT GRACE FT
        --hparams-dir hparams --hparams-name testbed-llama
        --skip-malformed --subject-aligned --num-edits 900 --chunk 100
        --stats-dir "${STATS_DIR:-results/stats}" --seed 0 --threads 1)
"$PYTHON" -m lemoe_easyedit.cli compare "${common[@]}" --data zsre \
  --data-path "$DATA/zsre/zsre_mend_train-1k.json" --out "$OUT/zsre"
"$PYTHON" -m lemoe_easyedit.cli compare "${common[@]}" --data counterfact \
  --data-path "$DATA/counterfact/counterfact-edit-1k.json" --out "$OUT/counterfact"
