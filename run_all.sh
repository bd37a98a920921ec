#!/usr/bin/env bash
# Train and evaluate every script of this repository in turn, then write the results table.
#
#   bash run_all.sh                      # paper data sets and schedules (a GPU box; torchrun when
#                                        # there are several GPUs)
#   bash run_all.sh --quick              # the synthetic shapes sets, minutes on a CPU, offline
#   bash run_all.sh --dry-run            # bench/gpu_check.py (every CUDA path), then every paper
#                                        # run for 2 steps and 2 test batches (real data,
#                                        # checkpoint, results.json): minutes on a GPU box,
#                                        # before the real runs (into results-dry-run/)
#   bash run_all.sh --only resnet yolo   # some runs only (a script name selects all its runs)
#   bash run_all.sh --dry-run --list     # print the selected runs' commands (NAME: COMMAND), run none
#   bash run_all.sh --skip alexnet vgg19 --out /scratch/results -- --amp --workers 8
#
# On several GPUs each run gets as many torchrun processes as divide its global batch (FCN's
# batch 1: one process), the number said in its log; RUN_ALL_GPUS=N overrides the GPU count.
# Everything after `--` is passed to every script. Each run writes OUT/runs/NAME/ (results.json,
# checkpoints, log.txt, command.txt, status.txt, error.txt on failure); a failing run does not stop
# the others. At the end OUT/summary.md and OUT/summary.csv are built from the results.json files
# only (by metrics.py), and the exit code is 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")"

QUICK=0 DRY=0 LIST=0 OUT="" ONLY=() SKIP=() EXTRA=() MODE="" FAILED=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; MODE="" ;;
        --dry-run) DRY=1; MODE="" ;;
        --list) LIST=1; MODE="" ;;
        --only) MODE=only ;;
        --skip) MODE=skip ;;
        --out) [ $# -ge 2 ] || { echo "run_all.sh: error: --out needs a folder" >&2; exit 2; }
               OUT=$2; shift; MODE="" ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run_all.sh: error: unknown flag $1 (see bash run_all.sh --help)" >&2; exit 2 ;;
        *) case "$MODE" in
               only) ONLY+=("$1") ;;
               skip) SKIP+=("$1") ;;
               *) echo "run_all.sh: error: unexpected '$1'; names go after --only or --skip" >&2
                  exit 2 ;;
           esac ;;
    esac
    shift
done

# A dry run replaces the dry run before it (--overwrite), never a real run's folder.
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-results-dry-run}
    EXTRA=(--dry-run --overwrite "${EXTRA[@]+"${EXTRA[@]}"}")
fi
OUT=${OUT:-results}

# The runs: NAME SCRIPT ARGS... Paper mode: each paper's data set and default (paper) recipe;
# ResNet: the CIFAR-10 table's depths; FCN: the paper's staged training 32s -> 16s -> 8s
# (@RUN stands for that run's final checkpoint); SSD and FCN start from torchvision's VGG-16;
# YOLO pre-trains its first 20 convolutions on ImageNet first (§2.2 says "approximately a week";
# 90 epochs is our choice).
if [ "$QUICK" = 1 ]; then
    # The README's offline commands: each learns something in seconds to minutes on a CPU.
    RUNS=(
        "lenet5 lenet5.py --data shapes --augment"
        "alexnet alexnet.py --data shapes --quick --epochs 12 --lr 0.001 --batch-size 16"
        "vgg19 vgg19.py --data shapes --quick --bn --epochs 12 --batch-size 32 --scale-max 40"
        "resnet resnet.py --data shapes --quick --depth 8 --img-size 32 --epochs 10 --batch-size 32 --lr 0.02"
        "resnext resnext.py --data shapes --quick --epochs 10 --batch-size 32 --lr 0.02 --cardinality 4"
        "googlenet googlenet.py --data shapes --quick"
        "nin googlenet.py --variant nin --data shapes --quick"
        "overfeat overfeat.py --data shapes --quick --batch-size 32 --epochs 25"
        "overfeat-loc overfeat.py --data shapes-det --quick"
        "overfeat-det overfeat.py --data shapes-det --task detection --quick --batch-size 64 --lr 0.02 --epochs 30 --loc-epochs 4 --negatives random"
        "monster_finetune monster_finetune.py --data shapes --quick --scratch --epochs 20"
        "yolo yolo.py --data shapes-det --quick"
        "ssd ssd.py --data shapes-det --quick"
        "fcn fcn.py --data shapes-seg --quick"
    )
else
    RUNS=(
        "lenet5 lenet5.py --data mnist"
        "alexnet alexnet.py --data imagenet"
        "vgg19 vgg19.py --data imagenet"
        "resnet-20 resnet.py --data cifar10 --depth 20"
        "resnet-32 resnet.py --data cifar10 --depth 32"
        "resnet-44 resnet.py --data cifar10 --depth 44"
        "resnet-56 resnet.py --data cifar10 --depth 56"
        "resnet-110 resnet.py --data cifar10 --depth 110"
        "resnext resnext.py --data cifar10 --depth 29 --cardinality 16 --bottleneck-width 64"
        "googlenet googlenet.py --data imagenet"
        "nin googlenet.py --variant nin --data cifar10"
        "overfeat overfeat.py --data imagenet --variant accurate"
        "overfeat-loc overfeat.py --data imagenet --task localisation --weights @overfeat"
        "monster_finetune monster_finetune.py --data cifar10 --pretrained"
        "yolo yolo.py --data voc --pretrain-epochs 50"
        "ssd ssd.py --data voc --pretrained"
        "fcn-32s fcn.py --data voc-seg --arch 32s --pretrained"
        "fcn-16s fcn.py --data voc-seg --arch 16s --init-from @fcn-32s"
        "fcn-8s fcn.py --data voc-seg --arch 8s --init-from @fcn-16s"
    )
fi

known=" "
for r in "${RUNS[@]}"; do
    set -- $r
    for x in "$1" "${2%.py}"; do [[ $known == *" $x "* ]] || known+="$x "; done
done
for x in "${ONLY[@]+"${ONLY[@]}"}" "${SKIP[@]+"${SKIP[@]}"}"; do
    [[ $known == *" $x "* ]] || { echo "run_all.sh: error: no run named '$x'; runs:$known" >&2; exit 2; }
done
selected() {  # a run is selected by its name or its script's (resnet selects resnet-20 ...)
    local name=$1 script=${2%.py} x
    for x in "${SKIP[@]+"${SKIP[@]}"}"; do [[ $x == "$name" || $x == "$script" ]] && return 1; done
    [ ${#ONLY[@]} -eq 0 ] && return 0
    for x in "${ONLY[@]}"; do [[ $x == "$name" || $x == "$script" ]] && return 0; done
    return 1
}

# Several GPUs: a paper run goes under torchrun (DDP, one process per GPU, the same global
# batch), on as many GPUs as divide its global batch: every script refuses a batch that its
# processes cannot share equally. The paper runs' global batches (each script's default, held
# equal to it by tests/test_run_all.py); `-- --batch-size N` replaces them all.
declare -A BATCH=([lenet5]=64 [alexnet]=128 [vgg19]=256 [resnet-20]=128 [resnet-32]=128
                  [resnet-44]=128 [resnet-56]=128 [resnet-110]=128 [resnext]=128 [googlenet]=256
                  [nin]=128 [overfeat]=128 [overfeat-loc]=128 [monster_finetune]=64 [yolo]=64 [ssd]=32
                  [fcn-32s]=1 [fcn-16s]=1 [fcn-8s]=1)
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    [ "${EXTRA[$i]}" = --batch-size ] && [ $((i + 1)) -lt ${#EXTRA[@]} ] && GIVEN_BATCH=${EXTRA[$((i + 1))]}
    [[ ${EXTRA[$i]} == --batch-size=* ]] && GIVEN_BATCH=${EXTRA[$i]#--batch-size=}
done
NGPU=${RUN_ALL_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
processes() {  # the most GPUs (<= NGPU) that divide run $1's global batch; 1 without several
    local batch=${GIVEN_BATCH:-${BATCH[$1]:-1}} n
    [ "$QUICK" = 0 ] && [ "${NGPU:-0}" -gt 1 ] || { echo 1; return; }
    for ((n = NGPU; n > 1; n--)); do (( batch % n == 0 )) && { echo $n; return; }; done
    echo 1
}
[ "$LIST" = 1 ] || { echo "run_all.sh: $NGPU GPU(s), out: $OUT"; mkdir -p "$OUT/runs"; }

# A dry run on a GPU box starts with the pre-flight of every CUDA path (bench/gpu_check.py, on
# tiny trees of its own), then dry-runs the paper runs on the real data.
if [ "$DRY" = 1 ] && [ "$LIST" = 0 ] && [ "${NGPU:-0}" -gt 0 ] && [ -z "${RUN_ALL_GPUS:-}" ] && [ ${#ONLY[@]} -eq 0 ]; then
    echo "=== gpu-check: python bench/gpu_check.py --out $OUT/gpu-check"
    python bench/gpu_check.py --out "$OUT/gpu-check" 2>"$OUT/gpu-check.err" || FAILED+=(gpu-check)
fi

for r in "${RUNS[@]}"; do
    set -- $r
    name=$1; script=$2; shift 2
    selected "$name" "$script" || continue
    dir="$OUT/runs/$name"
    args=()
    for a in "$@"; do
        [[ $a == @* ]] && a="$OUT/runs/${a#@}/checkpoint.pt"
        args+=("$a")
    done
    n=$(processes "$name")
    if [ "$n" -gt 1 ]; then LAUNCH=(torchrun --standalone "--nproc_per_node=$n"); else LAUNCH=(python); fi
    cmd=("${LAUNCH[@]}" "$script" "${args[@]}" --out "$dir" "${EXTRA[@]+"${EXTRA[@]}"}")
    if [ "$LIST" = 1 ]; then echo "$name: ${cmd[*]}"; continue; fi
    mkdir -p "$dir"
    rm -f "$dir/status.txt" "$dir/error.txt" "$dir/results.json"
    : > "$dir/log.txt"
    echo "${cmd[*]}" > "$dir/command.txt"
    echo "=== $name: ${cmd[*]}"
    if [ "${NGPU:-0}" -gt 1 ] && [ "$QUICK" = 0 ]; then
        echo "run_all.sh: $name on $n of $NGPU GPUs (global batch ${GIVEN_BATCH:-${BATCH[$name]}}: $n processes divide it)" | tee -a "$dir/log.txt"
    fi
    start=$(date +%s.%N)
    PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 | tee -a "$dir/log.txt"
    code=${PIPESTATUS[0]}
    end=$(date +%s.%N)
    echo "$code $(python -c "print(round($end - $start, 1))")" > "$dir/status.txt"
    if [ "$code" != 0 ]; then
        # The script's one-line error, else the last line it wrote (a traceback's exception).
        line=$(grep -E "^[a-z0-9_]+\.py: error:" "$dir/log.txt" | tail -1)
        [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$dir/log.txt" | tail -1)
        echo "${line:-exit code $code}" > "$dir/error.txt"
        echo "=== $name FAILED: ${line:-exit code $code}"
        FAILED+=("$name")
    fi
done

[ "$LIST" = 1 ] && exit 0
python metrics.py "$OUT/runs" --md "$OUT/summary.md" --csv "$OUT/summary.csv"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "run_all.sh: ${#FAILED[@]} run(s) failed: ${FAILED[*]}" >&2
    exit 1
fi
