#!/usr/bin/env bash
# The paper's comparisons on a 7B model (needs a GPU and your copies of the data):
# zsRE T=1000 and T=100 (10 chunks of 100 from the first 1000 edits), CounterFact T=1000,
# hallucination T=600 (perplexity), each for LEMoE, GRACE, MEMIT, ROME and FT.
#
#   MODEL=llama-7b   MODEL_PATH=/models/Llama-2-7b-hf \
#   ZSRE_PATH=/data/zsre_mend_eval.json COUNTERFACT_PATH=/data/counterfact-edit.json \
#   HALLU_PATH=/data/hallucination-edit.json MOM2_TEXT=/data/wikipedia_sample.txt \
#   examples/compare_paper.sh [OUT_DIR]
#
# MODEL selects hparams/<METHOD>/$MODEL.yaml: llama-7b (LLaMA-2-7B) or mistral-7b.
# MOM2_TEXT is a local text file (one document per line) for MEMIT's second-moment
# statistics (and ROME's, if you set mom2_adjustment: true); computed once, cached under
# STATS_DIR. Set DATASETS to run a subset, e.g. DATASETS="zsre hallucination".
# Unset data paths skip that data set. CHECKPOINTS=100 adds Rel/Gen/Loc after every 100
# edits; note that a checkpoint cuts a batch method's stream there (LEMoE then plans and
# trains each 100-edit installment on its own, and its paper YAML caps it at 5 experts), so
# the headline numbers come from runs without checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:=llama-7b}"
: "${MODEL_PATH:?set MODEL_PATH to the model directory or hub name}"
OUT="${1:-results/paper-$MODEL}"
PYTHON="${PYTHON:-python}"
METHODS="${METHODS:-LEMoE GRACE MEMIT ROME FT}"
DATASETS="${DATASETS:-zsre counterfact hallucination}"
STATS_DIR="${STATS_DIR:-results/stats}"
common=(--hparams-dir hparams --hparams-name "$MODEL" --model "$MODEL_PATH"
        --stats-dir "$STATS_DIR" --seed 0)
if [[ -n "${MOM2_TEXT:-}" ]]; then common+=(--mom2-dataset "$MOM2_TEXT"); fi
if [[ -n "${CHECKPOINTS:-}" ]]; then common+=(--checkpoints "$CHECKPOINTS"); fi

run() {  # run NAME ARGS...
  local name="$1"; shift
  echo "== $name"
  "$PYTHON" -m lemoe_easyedit.cli compare --methods $METHODS "${common[@]}" \
    --out "$OUT/$name" "$@" || echo "!! $name: some method failed, see $OUT/$name"
}

for ds in $DATASETS; do
  case "$ds" in
    zsre)
      if [[ -n "${ZSRE_PATH:-}" ]]; then
        run zsre-T1000 --data zsre --data-path "$ZSRE_PATH" --num-edits 1000 --chunk 1000 \
          --skip-malformed
        run zsre-T100 --data zsre --data-path "$ZSRE_PATH" --num-edits 1000 --chunk 100 \
          --skip-malformed
      fi ;;
    counterfact)
      if [[ -n "${COUNTERFACT_PATH:-}" ]]; then
        run counterfact-T1000 --data counterfact --data-path "$COUNTERFACT_PATH" \
          --num-edits 1000 --chunk 1000
      fi ;;
    hallucination)
      if [[ -n "${HALLU_PATH:-}" ]]; then
        # Passages are long: let every method edit with up to 256 tokens.
        run hallucination-T600 --data hallucination --data-path "$HALLU_PATH" \
          --num-edits 600 --chunk 600 --max-length 256
      fi ;;
    *) echo "unknown data set $ds" >&2; exit 2 ;;
  esac
done
echo "tables: $OUT/*/compare.md"
