#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (2.5–4.5 minutes on one H200 before step 4 was added:
# 154 and 271 s measured; step 4 is designed to take about 3 minutes more, not measured yet):
#
#   scripts/cuda_check.sh [OUT_DIR]        # default: results/timing/cuda/check
#   CUDA_CHECK_STEPS="tests triton" scripts/cuda_check.sh      # only some of the steps
#
# 1. tests: every CUDA-only test (tests/test_cuda.py and the CUDA tests beside the masks, the draw
#    panels, the flow, the 16-bit scaler and MisConv's Triton kernels); all are skipped on a machine
#    without CUDA.
# 2. precision: scripts/compare_precision.py on CUDA, float32 against bf16-mixed and 16-mixed, three
#    seeds (needs MNIST and results/dmfa/cpu/mnist_complete.pt) -> results/timing/cuda/precision_comparison.*
# 3. timing: the paper's forward grid (MisConv against conv2d+ReLU, sizes 28/32/64, batches
#    16/32/64), eager path and backward included, wall clock (./lab study timing, through the same
#    interpreter) -> results/timing/cuda/forward/
# 4. triton: benchmarks/bench_misconv_gpu.py, MisConv's fused Triton path against conv2d+ReLU, the
#    eager formula and the CPU fast path (the paper's grid forward and forward+backward, larger
#    batches, end to end per image, a training step of the MNIST and CIFAR-10 classifiers), the
#    targets checked -> results/timing/cuda/triton/ (table.md, summary.csv, timings.csv, machine.json)
#
# Each step has its own time limit, so one that hangs leaves the others their time; the exit code
# is 0 only if every step passed. Logs: OUT_DIR/<step>.log. PYTHON picks the interpreter (default:
# .venv/bin/python if present, else python3); CUDA_CHECK_STEPS the steps (default: all four).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/timing/cuda/check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
status=0

STEPS=${CUDA_CHECK_STEPS:-tests precision timing triton}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) echo "== $name: not in CUDA_CHECK_STEPS, skipped"; return ;; esac
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
}

nvidia-smi -L 2>&1 | head -n 2
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || exit 1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1

step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda \
    tests/test_cuda.py tests/test_masks.py tests/test_draw.py tests/test_acflow.py tests/test_precision.py \
    tests/test_misconv_triton.py
step precision 200 "$PY" scripts/compare_precision.py --device cuda --precisions 32 bf16-mixed 16-mixed \
    --results-dir results/timing/cuda
step timing 150 "$PY" -m labkit.lab.study_cli timing --profile cpu -p device=cuda -p repeats=200 -p eager_repeats=20 \
    -p backward=true -p 'Ks=[]' -p 'Ls=[]' -p 'end_to_end_datasets=[]' --no-progress --results results/timing/cuda/forward
step triton 240 "$PY" benchmarks/bench_misconv_gpu.py --out results/timing/cuda/triton
exit $status
