#!/usr/bin/env bash
# LEMoE against ROME, MEMIT, GRACE and FT on EasyEdit's own CounterFact and zsRE files, with
# the realfact model (lemoe_easyedit.realfact: a 1.8M-parameter LLaMA pretrained on the true
# facts of these records, shipped in the package). Lifelong protocol: all T edits applied,
# then every edit scored on the final model. CPU is enough.
#
#   examples/realfact_compare.sh [OUT_DIR] [DATA_DIR]
#
# The runner keeps the records the unedited model knows (prompt, paraphrase and locality
# prompt answered exactly; --known auto) and edits targets followed by </s> as the model ends
# its facts (--end-token auto); --same-subject-probes adds the hard locality case these files
# lack, each edited subject asked another record's question (lemoe_easyedit.evaluation.probes).
# Every method uses hparams/<METHOD>/realfact-llama.yaml, tuned on held-out records
# (examples/realfact_tune.py: background records, and for LEMoE also each file's known records
# after the first 900), never on the first 900 these runs edit (N_EDITS > 900 would reach them).
#   OUT_DIR/counterfact, OUT_DIR/zsre   the final tables (T = N_EDITS in one stream);
#   OUT_DIR/*-curve                     Rel/Gen/Loc after every CURVE_EVERY edits (LEMoE then
#                                       gets its stream in installments; CURVE=0 skips).
# METHODS (default "LEMoE GRACE FT ROME MEMIT") and N_EDITS (default 900) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/realfact}"
DATA="${2:-../shared/data}"
PYTHON="${PYTHON:-python}"
N="${N_EDITS:-900}"
read -r -a METHODS <<< "${METHODS:-LEMoE GRACE FT ROME MEMIT}"
common=(--methods "${METHODS[@]}" --hparams-name realfact-llama --skip-malformed
        --num-edits "$N" --chunk "$N" --stats-dir "${STATS_DIR:-results/stats}"
        --seed 0 --threads 1 --no-progress --same-subject-probes)
for set in counterfact zsre; do
  if [[ $set == counterfact ]]; then file="$DATA/counterfact/counterfact-edit-1k.json"
  else file="$DATA/zsre/zsre_mend_train-1k.json"; fi
  "$PYTHON" -m lemoe_easyedit.evaluation.runner compare "${common[@]}" --data "$set" \
    --data-path "$file" --out "$OUT/$set"
  if [[ "${CURVE:-1}" == 1 ]]; then
    "$PYTHON" -m lemoe_easyedit.evaluation.runner compare "${common[@]}" --data "$set" \
      --data-path "$file" --checkpoints "${CURVE_EVERY:-150}" --out "$OUT/$set-curve"
  fi
done
