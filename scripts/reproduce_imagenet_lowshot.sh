#!/usr/bin/env bash
# The paper's second table end to end: the ImageNet-1K low-shot benchmark (Hariharan & Girshick 2017).
# ILSVRC-2012 folders -> val images in class folders -> stage 1 on the 389 base classes (every image)
# -> stage 2 on base-class episodes -> lowshot_imagenet.py (5 trials, n = 1 2 5 10 20, both setups).
# Each step is skipped when its result exists and resumed when its run folder holds an interrupted run;
# the feature files of the evaluation resume by themselves.
#   IMAGENET=/data/ILSVRC2012 LOWSHOT=/data/lowshot NPROC=4 bash scripts/reproduce_imagenet_lowshot.sh
# IMAGENET holds train/<wnid>/ and val/ (flat or in class folders); LOWSHOT holds label_idx.json,
# splitfile_{1..5}.json and train.json (docs/lowshot.md's download command). TRAINLIST (default
# LOWSHOT/train.json when it is there) is the release's list of training images that the split files
# index; without it the list is rebuilt from the folders and the shots differ from the benchmark's
# (a warning at the start says so). A flat val/ is folded with VAL_LABELS (a
# 'filename wnid' file or Kaggle's LOC_val_solution.csv) or DEVKIT (the ILSVRC-2012 devkit; needs scipy).
# models/ and runs/ go under WORKDIR (default: the repository); relative paths are taken from there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORKDIR=${WORKDIR:-$REPO}
mkdir -p "$WORKDIR" && cd "$WORKDIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

IMAGENET=${IMAGENET:?set IMAGENET to the ILSVRC-2012 folder holding train/ and val/}
LOWSHOT=${LOWSHOT:?set LOWSHOT to the folder holding label_idx.json, splitfile_1..5.json and train.json}
NPROC=${NPROC:-1}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
SEED=${SEED:-0}
AMP=${AMP:-1}
SIZE=${SIZE:-224}
BACKBONE=${BACKBONE:-resnet18}
release_list=""
[ -f "$LOWSHOT/train.json" ] && release_list="$LOWSHOT/train.json"
TRAINLIST=${TRAINLIST-$release_list}  # set it empty to rebuild the list from the folders
PREFIX=${PREFIX:-imagenet}
EPOCHS1=${EPOCHS1:-35}       # stage 1 epochs (each sees every base-class image twice)
BATCH1=${BATCH1:-256}        # stage 1 global batch
EPOCHS2=${EPOCHS2:-120}      # stage 2 epochs of EPISODES training episodes
EPISODES=${EPISODES:-600}
VALEPISODES=${VALEPISODES:-600}
GALLERY=${GALLERY:-30}       # gallery images per base class (stage 2 and the evaluation)
TRIALS=${TRIALS:-1 2 3 4 5}
LOWSHOTN=${LOWSHOTN:-1 2 5 10 20}
META="$LOWSHOT/label_idx.json"
common=(--imageSize "$SIZE" --nthreads "$THREADS" --seed "$SEED" --amp "$AMP" --device "$DEVICE")
if [ -z "$TRAINLIST" ]; then
  echo "warning: no $LOWSHOT/train.json and no TRAINLIST: the training list will be rebuilt with each class's files" \
    "sorted by name, not the release's order, so the split files pick other images and the shots differ from" \
    "the benchmark's" >&2
fi

if compgen -G "$IMAGENET/val/*.JPEG" > /dev/null; then
  echo "== folding $IMAGENET/val into class folders"
  if [ -n "${VAL_LABELS:-}" ]; then
    python "$REPO/scripts/fold_imagenet_val.py" --val "$IMAGENET/val" --labels "$VAL_LABELS"
  else
    python "$REPO/scripts/fold_imagenet_val.py" --val "$IMAGENET/val" --devkit "${DEVKIT:?set VAL_LABELS or DEVKIT to fold val/}"
  fi
fi

# step NAME DONE_FILE LAUNCHER SCRIPT ARGS...: run unless DONE_FILE exists; resume an interrupted run.
step() {
  local name=$1 final=$2 launcher=$3 script=$4
  shift 4
  if [ -f "$final" ]; then
    echo "== $name: $final exists, skipped"
    return
  fi
  echo "== $name"
  local mode=--overwrite
  [ -f "runs/$name/resume.pt" ] && mode=--resume
  $launcher "$REPO/$script" "${common[@]}" --tensorname "$name" "$mode" "$@"
}

if [ "$NPROC" -gt 1 ]; then multi="torchrun --nproc_per_node=$NPROC"; else multi=python; fi

step "${PREFIX}_stage1" "runs/${PREFIX}_stage1/summary.json" "$multi" classification.py \
  --dataroot "$IMAGENET" --lowshotmeta "$META" --filesPerClass 0 --backbone "$BACKBONE" --numEpochs "$EPOCHS1" \
  --batchSize "$BATCH1" --valEpisodes "$VALEPISODES"
step "${PREFIX}_metaNet" "runs/${PREFIX}_metaNet/evaluate_1shot_seed${SEED}.json" python onlyBasetwoLoss.py \
  --dataroot "$IMAGENET" --lowshotmeta "$META" --network "${PREFIX}_stage1" --shots 1 --augnum 7 --chooseNum 15 \
  --fixCls 1 --galleryNum "$GALLERY" --numEpochs "$EPOCHS2" --epoch "$EPISODES" --valEpisodes "$VALEPISODES" \
  --testEpisodes "$VALEPISODES"

report="runs/${PREFIX}_lowshot/lowshot_imagenet.json"
if [ -f "$report" ]; then
  echo "== ${PREFIX}_lowshot: $report exists, skipped"
  exit 0
fi
echo "== ${PREFIX}_lowshot"
trainlist=()
[ -n "$TRAINLIST" ] && trainlist=(--trainlist "$TRAINLIST")
$multi "$REPO/lowshot_imagenet.py" "${common[@]}" --imagenet "$IMAGENET" --lowshotmeta "$META" \
  --experimentpath "$LOWSHOT/splitfile_{:d}.json" ${trainlist[@]+"${trainlist[@]}"} --GNet "${PREFIX}_metaNet" \
  --galleryNum "$GALLERY" --trials $TRIALS --lowshotn $LOWSHOTN --tensorname "${PREFIX}_lowshot"
