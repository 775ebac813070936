#!/usr/bin/env bash
# The paper's second table end to end: the ImageNet-1K low-shot benchmark (Hariharan & Girshick 2017).
# ILSVRC-2012 folders -> val images in class folders -> stage 1 on the 389 base classes (every image)
# -> stage 2 on base-class episodes -> lowshot_imagenet.py (5 trials, n = 1 2 5 10 20, both setups).
# Each step is skipped when its result exists and the record next to it (<result>.inputs: the script,
# its settings and the sha256 of each input file) is this run's; otherwise it runs again: a training
# step resumes its run when runs/<name>/resume.pt is newer than every input file (an interrupted run
# continues; the scripts refuse, with one line, a resume whose settings conflict: delete runs/<name>
# to start it anew), else starts anew; the evaluation reuses by itself the feature files and trials
# computed with the same settings.
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
common=(--imageSize "$SIZE" --seed "$SEED" --amp "$AMP")  # recorded with each result
machine=(--nthreads "$THREADS" --device "$DEVICE")        # not recorded: they do not change a result
if [ -z "$TRAINLIST" ]; then
  echo "warning: no $LOWSHOT/train.json and no TRAINLIST: the training list will be rebuilt with each class's files" \
    "sorted by name, not the release's order, so the split files pick other images and the shots differ from" \
    "the benchmark's" >&2
fi

if compgen -G "$IMAGENET/val/*.JPEG" > /dev/null; then
  echo "== folding $IMAGENET/val into class folders"
  if [ -n "${VAL_LABELS:-}" ]; then
    python -m scripts.fold_imagenet_val --val "$IMAGENET/val" --labels "$VAL_LABELS"
  else
    python -m scripts.fold_imagenet_val --val "$IMAGENET/val" --devkit "${DEVKIT:?set VAL_LABELS or DEVKIT to fold val/}"
  fi
fi

# record SCRIPT ARGS...: what a step's result depends on, one item a line: the script, its arguments
# and the sha256 of each file of the array INPUTS (set before each step).
record() {
  printf '%s\n' "$@"
  python -c 'import hashlib, sys
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        print(hashlib.sha256(handle.read()).hexdigest(), path)' "${INPUTS[@]}"
}

# step NAME RESULT LAUNCHER SCRIPT ARGS...: skipped when RESULT exists with this run's record, else run
# (a training script resumes or starts anew, as the header says) and the record written next to RESULT.
step() {
  local name=$1 result=$2 launcher=$3 script=$4 wanted
  shift 4
  wanted=$(record "$script" "${common[@]}" "$@")
  if [ -f "$result" ] && [ -f "$result.inputs" ] && [ "$(cat "$result.inputs")" = "$wanted" ]; then
    echo "== $name: $result exists with these inputs and settings, skipped"
    return
  fi
  echo "== $name"
  local mode=() input
  if [ "$script" != lowshot_imagenet.py ]; then
    mode=(--resume)
    for input in "${INPUTS[@]}"; do  # -nt is also true when there is no resume.pt
      if [ "$input" -nt "runs/$name/resume.pt" ]; then mode=(--overwrite); fi
    done
  fi
  $launcher "$REPO/$script" "${machine[@]}" "${common[@]}" --tensorname "$name" ${mode[@]+"${mode[@]}"} "$@"
  echo "$wanted" > "$result.inputs"
}

if [ "$NPROC" -gt 1 ]; then multi="torchrun --nproc_per_node=$NPROC"; else multi=python; fi

INPUTS=("$META")
step "${PREFIX}_stage1" "runs/${PREFIX}_stage1/summary.json" "$multi" classification.py \
  --dataroot "$IMAGENET" --lowshotmeta "$META" --filesPerClass 0 --backbone "$BACKBONE" --numEpochs "$EPOCHS1" \
  --batchSize "$BATCH1" --valEpisodes "$VALEPISODES"
INPUTS=("$META" "models/${PREFIX}_stage1.t7")
step "${PREFIX}_metaNet" "runs/${PREFIX}_metaNet/evaluate_1shot_seed${SEED}.json" python onlyBasetwoLoss.py \
  --dataroot "$IMAGENET" --lowshotmeta "$META" --network "${PREFIX}_stage1" --shots 1 --augnum 7 --chooseNum 15 \
  --fixCls 1 --galleryNum "$GALLERY" --numEpochs "$EPOCHS2" --epoch "$EPISODES" --valEpisodes "$VALEPISODES" \
  --testEpisodes "$VALEPISODES"

INPUTS=("$META" "models/${PREFIX}_metaNet.t7")
for trial in $TRIALS; do INPUTS+=("$LOWSHOT/splitfile_$trial.json"); done
trainlist=()
if [ -n "$TRAINLIST" ]; then
  trainlist=(--trainlist "$TRAINLIST")
  INPUTS+=("$TRAINLIST")
fi
step "${PREFIX}_lowshot" "runs/${PREFIX}_lowshot/lowshot_imagenet.json" "$multi" lowshot_imagenet.py \
  --imagenet "$IMAGENET" --lowshotmeta "$META" --experimentpath "$LOWSHOT/splitfile_{:d}.json" \
  ${trainlist[@]+"${trainlist[@]}"} --GNet "${PREFIX}_metaNet" --galleryNum "$GALLERY" --trials $TRIALS \
  --lowshotn $LOWSHOTN
