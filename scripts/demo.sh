#!/usr/bin/env bash
# The whole method on generated toy data, on the CPU, in under five minutes on two cores:
# toy data -> stage 1 (embedding) -> stage 2 (1-shot deformation) -> test evaluation with and
# without deformation -> figures. It runs the real scripts with small settings, prints an
# estimate of its time before it starts and the time of each stage at the end.
# Settings come from the environment; QUICK=1 halves the training and evaluation (for CI).
# It writes data/, models/, runs/ and picture/ under WORKDIR (default: runs/demo of the repository,
# which git ignores, so the checkout stays clean); FIGURES=DIR also copies the figures into DIR
# (FIGURES=docs/figures regenerates the README's).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$REPO/runs/demo}
FIGURES=${FIGURES:+$(mkdir -p "$FIGURES" && cd "$FIGURES" && pwd)}  # absolute: the demo runs in WORKDIR
mkdir -p "$WORKDIR" && cd "$WORKDIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

DATA=${DATA:-data/toy}
SIZE=${SIZE:-32}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
SEED=${SEED:-0}
QUICK=${QUICK:-0}
half() { if [ "$QUICK" = 1 ]; then echo $(( ($1 + 1) / 2 )); else echo "$1"; fi; }
S1_EPOCHS=${S1_EPOCHS:-$(half 4)}
S1_FILES=${S1_FILES:-20}
MONITOR=${MONITOR:-$(half 100)}
S2_EPOCHS=${S2_EPOCHS:-2}
EPISODES=${EPISODES:-$(half 60)}
VAL=${VAL:-$(half 40)}
TEST=${TEST:-$(half 40)}
EVAL=${EVAL:-$(half 300)}
GALLERY=10
GALLERY_BN=${GALLERY_BN:-train}  # stage 2's gallery pass: train (the original's) or eval

start=$SECONDS
if [ ! -f "$DATA/train.csv" ]; then
  python -m datasets.toy --out "$DATA" --seed "$SEED" --size $(( SIZE * 4 / 3 ))
fi
python -m datasets.check --dataroot "$DATA" > /dev/null || [ $? -eq 1 ]

python -m scripts.demo_estimate --dataroot "$DATA" --imageSize "$SIZE" --nthreads "$THREADS" \
  --stage1Epochs "$S1_EPOCHS" --stage1Batch 64 --filesPerClass "$S1_FILES" --monitorEpisodes "$MONITOR" \
  --stage2Epochs "$S2_EPOCHS" --episodes "$EPISODES" --galleryNum "$GALLERY" --valEpisodes "$VAL" \
  --testEpisodes "$TEST" --evalEpisodes "$EVAL"

common=(--dataroot "$DATA" --imageSize "$SIZE" --device "$DEVICE" --nthreads "$THREADS" --seed "$SEED" --overwrite)
setup=$(( SECONDS - start ))

echo "== stage 1: soft-random embedding pre-training"
python "$REPO/classification.py" "${common[@]}" --tensorname demo_stage1 --numEpochs "$S1_EPOCHS" --batchSize 64 \
  --filesPerClass "$S1_FILES" --valEvery 0 --valEpisodes "$MONITOR"
stage1=$(( SECONDS - start - setup ))

echo "== stage 2: 1-shot deformation meta-learning (round 1, --fixCls 1), gallery pass --galleryBN $GALLERY_BN"
python "$REPO/onlyBasetwoLoss.py" "${common[@]}" --network demo_stage1 --tensorname demo_1shot --shots 1 --augnum 7 \
  --chooseNum 15 --fixCls 1 --galleryNum "$GALLERY" --galleryBN "$GALLERY_BN" --numEpochs "$S2_EPOCHS" \
  --epoch "$EPISODES" --valEpisodes "$VAL" --testEpisodes "$TEST"
stage2=$(( SECONDS - start - setup - stage1 ))

echo "== evaluation on $EVAL test episodes, with and without deformation, gallery pass --galleryBN $GALLERY_BN"
python "$REPO/onlyBasetwoLoss.py" "${common[@]}" --GNet demo_1shot --tensorname demo_1shot --shots 1 --augnum 7 \
  --chooseNum 15 --galleryNum "$GALLERY" --galleryBN "$GALLERY_BN" --evaluate --testEpisodes "$EVAL"
evaluation=$(( SECONDS - start - setup - stage1 - stage2 ))

python -m scripts.plot_metrics runs/demo_1shot/metrics.csv --out picture/demo_1shot_curves.png
echo
python -m scripts.summarize runs/demo_1shot/evaluate_1shot_seed"$SEED".json
if [ -n "$FIGURES" ]; then
  cp picture/demo_1shot_deformed.png picture/demo_1shot_deformed_train.png picture/demo_1shot_curves.png "$FIGURES"/
fi
echo "outputs in $WORKDIR: models/, runs/demo_1shot/ (metrics.csv, evaluate_1shot_seed$SEED.json)"
echo "figures: $WORKDIR/picture/demo_1shot_deformed.png (probe | gallery | weights | deformed)," \
  "demo_1shot_deformed_train.png (a training episode), demo_1shot_curves.png (losses and accuracies)"
echo "elapsed: data and estimate ${setup} s, stage 1 ${stage1} s, stage 2 ${stage2} s, evaluation ${evaluation} s," \
  "total $(( SECONDS - start )) s"
