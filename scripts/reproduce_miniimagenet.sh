#!/usr/bin/env bash
# The paper's recipe end to end on miniImageNet at 224 px: stage 1, 1-shot and 5-shot
# deformation meta-learning (round 1), round 2 (embedding update), final evaluations over
# 600 test episodes. Each step is skipped when its checkpoint exists and resumed when its
# run folder holds an interrupted run.
#   DATA=/path/to/miniImageNet bash scripts/reproduce_miniimagenet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/miniImageNet}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
SEED=${SEED:-0}
AMP=${AMP:-0}
common=(--dataroot "$DATA" --device "$DEVICE" --nthreads "$THREADS" --seed "$SEED" --amp "$AMP")

python -m datasets.check --dataroot "$DATA" || [ $? -eq 1 ]

# step NAME DONE_FILE SCRIPT ARGS...: run unless DONE_FILE (written when a run completes) exists;
# resume an interrupted run.
step() {
  local name=$1 final=$2 script=$3
  shift 3
  if [ -f "$final" ]; then
    echo "== $name: $final exists, skipped"
    return
  fi
  echo "== $name"
  if [ -f "runs/$name/resume.pt" ]; then
    python "$script" "${common[@]}" --tensorname "$name" --resume "$@"
  else
    python "$script" "${common[@]}" --tensorname "$name" --overwrite "$@"
  fi
}

step softRandom runs/softRandom/summary.json classification.py --numEpochs 35
step metaNet_1shot runs/metaNet_1shot/evaluate_1shot_seed"$SEED".json onlyBasetwoLoss.py --network softRandom \
  --shots 1 --augnum 7 --fixCls 1 --chooseNum 15
step metaNet_5shot runs/metaNet_5shot/evaluate_5shot_seed"$SEED".json onlyBasetwoLoss.py --network softRandom \
  --shots 5 --augnum 5 --fixCls 1 --chooseNum 30
step metaNet_1shot_round2 runs/metaNet_1shot_round2/evaluate_1shot_seed"$SEED".json onlyBasetwoLoss.py --network softRandom \
  --GNet metaNet_1shot --shots 1 --augnum 7 --fixCls 0 --fixAttention 1 --chooseNum 15
step metaNet_5shot_round2 runs/metaNet_5shot_round2/evaluate_5shot_seed"$SEED".json onlyBasetwoLoss.py --network softRandom \
  --GNet metaNet_5shot --shots 5 --augnum 5 --fixCls 0 --fixAttention 1 --chooseNum 30

for run in metaNet_1shot:1:7:15 metaNet_5shot:5:5:30 metaNet_1shot_round2:1:7:15 metaNet_5shot_round2:5:5:30; do
  IFS=: read -r name shots augnum choose <<< "$run"
  python onlyBasetwoLoss.py "${common[@]}" --GNet "$name" --tensorname "$name" --shots "$shots" \
    --augnum "$augnum" --chooseNum "$choose" --evaluate --testEpisodes 600
done
python -m scripts.summarize runs/metaNet_*/evaluate_*shot_seed"$SEED".json
