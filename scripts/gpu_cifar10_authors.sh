#!/usr/bin/env bash
# The CIFAR-10 cells at the authors' budget (profile cifar10_authors) on a GPU machine, in one call
# that ends before its time limit, with the recorded rows copied out to bring home:
#
#   scripts/gpu_cifar10_authors.sh OUT_DIR            # on the GPU machine
#   ./lab study classification --profile cifar10_authors --merge-from OUT_DIR   # back here: merge, tables
#
# Several sweep processes share the GPU (PROCS, default 4; the cell claims split the cells between
# them) and go through the cells in order of need: zero, DMFA mean and MisConv over the
# incomplete-data DMFA for seeds 0-2; ground truth seed 0; the complete-data pair; ground truth
# seeds 1-2. Every process stops at the deadline (LIMIT seconds after the start, default 540, so a
# 600-second call still copies its rows); a cell cut off there is lost (its epoch checkpoint stays
# on that machine), the finished ones are in OUT_DIR: accuracy.csv, runs.jsonl, predictions.jsonl
# (the results folder's files as they stand, committed rows included: merging skips the rows here
# already) and sweeps.log. Rows found in the committed results are not run again there.
#
# Data: the loader's usual places (data/cifar10-jpeg, ../shared/datasets). A machine that has
# neither gets the offline archive carried in an ignored folder:
#   mkdir -p .gpu/datasets/cifar10-jpeg && echo /.gpu/ >> .git/info/exclude
#   cp ../shared/datasets/cifar10-jpeg/cifar10-jpeg.tar.gz .gpu/datasets/cifar10-jpeg/
# (19 MB; the script points LABKIT_SHARED_DATASETS at .gpu/datasets when it exists).
#
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3), PROFILE the
# profile (default cifar10_authors; a small YAML that extends it tries the script on a CPU), and
# REQUIRE_CUDA=0 lets it run without a GPU (a trial; the cells then run on the CPU).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: scripts/gpu_cifar10_authors.sh OUT_DIR}
PROCS=${PROCS:-4}
LIMIT=${LIMIT:-540}
PROFILE=${PROFILE:-cifar10_authors}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu/datasets ] && export LABKIT_SHARED_DATASETS="$PWD/.gpu/datasets"
START=$SECONDS
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/sweeps.log"
: > "$LOG"

"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || exit 1
if [ "${REQUIRE_CUDA:-1}" = 1 ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (REQUIRE_CUDA=0 runs anyway)')" || exit 1
fi
# extract the images once, before the processes would all try at the same moment
"$PY" -c "from labkit.data import load_dataset
for split in ('train', 'test'):
    print('cifar10', split, len(load_dataset('cifar10', split, download=False)), 'images')" || exit 1

sweep() {  # sweep N -p ... : one process's pass over some cells, stopped at the deadline
    local n=$1
    shift
    local left=$((LIMIT - (SECONDS - START)))
    [ "$left" -gt 20 ] || return 0
    timeout "$left" "$PY" -m labkit.lab.study_cli classification --profile "$PROFILE" "$@" \
        --threads 2 --no-progress >> "$OUT_DIR/sweep_$n.part" 2>&1
}

for n in $(seq 1 "$PROCS"); do
    (
        sweep "$n" -p "methods=[zero,dmfa_mean_incomplete,dmfa_misconv_incomplete]" -p "seeds=[0,1,2]"
        sweep "$n" -p "methods=[gt]" -p "seeds=[0]"
        sweep "$n" -p "methods=[dmfa_mean_complete,dmfa_misconv_complete]" -p "seeds=[0,1,2]"
        sweep "$n" -p "methods=[gt]" -p "seeds=[1,2]"
    ) &
    sleep 3
done
wait
for n in $(seq 1 "$PROCS"); do
    { echo "== process $n"; cat "$OUT_DIR/sweep_$n.part"; } >> "$LOG" 2>/dev/null
    rm -f "$OUT_DIR/sweep_$n.part"
done
RESULTS="results/classification/$(basename "$PROFILE" .yaml)"
for f in accuracy.csv runs.jsonl predictions.jsonl; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT_DIR/"
done
grep -h "^\[classification\] ran " "$LOG" || true
echo "== $(($(grep -c "" "$RESULTS/accuracy.csv" 2>/dev/null || echo 1) - 1)) rows in $RESULTS/accuracy.csv" \
     "after $((SECONDS - START)) s; copied to $OUT_DIR"
