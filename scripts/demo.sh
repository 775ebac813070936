#!/usr/bin/env bash
# The whole method on generated toy data, on the CPU, in a few minutes:
# toy data -> stage 1 (embedding) -> stage 2 (1-shot deformation) -> test evaluation with and
# without deformation -> figures. It runs the real scripts with small settings.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/toy}
SIZE=${SIZE:-64}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
SEED=${SEED:-0}

if [ ! -f "$DATA/train.csv" ]; then
  python -m datasets.toy --out "$DATA" --seed "$SEED"
fi
python -m datasets.check --dataroot "$DATA" > /dev/null || [ $? -eq 1 ]

common=(--dataroot "$DATA" --imageSize "$SIZE" --device "$DEVICE" --nthreads "$THREADS" --seed "$SEED" --overwrite)

echo "== stage 1: soft-random embedding pre-training"
python classification.py "${common[@]}" --tensorname demo_stage1 --numEpochs 5 --batchSize 64 \
  --valEvery 0 --valEpisodes 100

echo "== stage 2: 1-shot deformation meta-learning (round 1, --fixCls 1)"
python onlyBasetwoLoss.py "${common[@]}" --network demo_stage1 --tensorname demo_1shot --shots 1 --augnum 7 \
  --chooseNum 15 --fixCls 1 --galleryNum 10 --numEpochs 3 --epoch 80 --valEpisodes 50 --testEpisodes 50

echo "== evaluation on 300 test episodes, with and without deformation"
python onlyBasetwoLoss.py "${common[@]}" --GNet demo_1shot --tensorname demo_1shot --shots 1 --augnum 7 \
  --chooseNum 15 --galleryNum 10 --evaluate --testEpisodes 300

python scripts/plot_metrics.py runs/demo_1shot/metrics.csv --out picture/demo_1shot_curves.png
echo
python scripts/summarize.py runs/demo_1shot/evaluate_1shot_seed"$SEED".json
echo "figures: picture/demo_1shot_deformed.png (probe | gallery | weights | deformed)"
