#!/bin/bash
# One session on a lent GPU machine (jax, flax, optax, orbax, chex and torch there;
# no TensorFlow, no network). Run from the repo root, with the wheels of clu,
# ml-collections and dm-pix in .whl/ (benchmarks/README.md, "GPU"):
#
#   bash benchmarks/device_run.sh [END_TRAIN_S [BENCH_S]]
#
# 1. GPU benchmarks of the training step at batch 64, 128x128, time-boxed to BENCH_S:
#    JAX float32 against the PyTorch peer (eager), JAX with the input channels padded
#    for cuDNN's tensor-core kernels (`train_step.py --conv=xla_pad`; this variant was
#    `--config.conv_impl=xla_pad` before the config's conv_impl field was replaced by
#    cpu_kernels='auto'|'off'), then the same in bfloat16 against torch
#    autocast(bfloat16). The float32 runs also trace 3 steps with jax.profiler and list
#    the kernels that take the time ('top_ops'). (The second session measured the
#    up-conv forms: benchmarks/README.md.)
# 2. The synthetic experiments of RESULTS.md at the paper's 128x128, trained side by
#    side on the one GPU until END_TRAIN_S seconds after the start, stopped with SIGTERM
#    (the loop saves a checkpoint and exits), then each evaluated on the 1000 test
#    triplets. Run directories are named as sils_jax.reproduce names them, so
#    `python -m sils_jax.reproduce --workdir=DIR --summary` tabulates them.
# Everything lands in $OUT (or /tmp/device_out): bench.jsonl, runs.tgz, log.txt.
# Budget: END_TRAIN_S + ~90 s (evaluation, archive); run it with timeout_s >=
# END_TRAIN_S + 110.
#
# SMOKE=1 runs the same plan on a CPU at toy sizes (to check the script, not to measure).
# History: 2026-11-27 (first lent session) ran `device_run.sh 265 150` under a 330 s
# limit, benchmarks only (results/h200_2026-11-27.jsonl): its training runs never
# reached evaluation, because a bare `wait` also waited for the log's `tee` and hung
# until the limit (found with SMOKE=1 and fixed: `wait $PIDS`). The second lent session
# ran `device_run.sh 450 180` under a 600 s limit: everything done in 471 s
# (results/h200_2026-11-27b.jsonl, results/h200_synthetic128_2026-11-27.json); the
# benchmark list was then changed to the one above (xla_pad instead of the up-conv forms;
# the vmapped layer streams, benchmarks/streams_vmap.py, were dropped with that script).
set -u
T0=$(date +%s)
END_TRAIN=${1:-470}  # seconds after start at which training is stopped
BENCH_S=${2:-200}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1 && [ "${SMOKE:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; SIZE=32; BATCH=2; STEPS=2; WARM=1
  TRAIN_CONFIG="configs/synthetic.py:quick"
  TRAIN_EXTRA="--config.image_size=32 --config.num_test=20 --config.num_eval_images=10 --config.eval_batch_size=10"
  EVAL_EXTRA="--num_images=20 --batch_size=10"
else
  DEV=cuda; SIZE=128; BATCH=64; STEPS=30; WARM=5
  TRAIN_CONFIG="configs/synthetic.py"
  TRAIN_EXTRA=""
  EVAL_EXTRA=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
elapsed() { echo $(( $(date +%s) - T0 )); }

# --- 1. benchmarks, time-boxed to BENCH_S so training keeps its share ------------
B=$OUT/bench.jsonl
J="python3 benchmarks/train_step.py --config=configs/synthetic.py --batch=$BATCH --image_size=$SIZE --steps=$STEPS --warmup=$WARM"
T="python3 benchmarks/torch_reference.py --device=$DEV --image_size=$SIZE --batch=$BATCH --steps=$STEPS --warmup=$WARM"
timeout $BENCH_S bash -c "
$J --profile_steps=3 >> $B || echo 'jax fp32 failed';
$T >> $B || echo 'torch eager fp32 failed';
$J --conv=xla_pad --name=synthetic_xla_pad --profile_steps=3 >> $B || echo 'jax xla_pad fp32 failed';
$J --dtype=bfloat16 >> $B || echo 'jax bf16 failed';
$T --autocast=bf16 >> $B || echo 'torch autocast bf16 failed';
$J --conv=xla_pad --dtype=bfloat16 --name=synthetic_xla_pad >> $B || echo 'jax xla_pad bf16 failed'
" || echo "benchmarks stopped at the time box ($BENCH_S s)"
echo "benchmarks done at $(elapsed) s"
python3 benchmarks/compare.py --from_file=$B

# --- 2. training runs, side by side on the one GPU -------------------------------
R=/tmp/runs
mkdir -p $R
# Seven processes on one GPU: without MPS the GPU time-slices between them and
# their small kernels never overlap. Start MPS if the machine has it, check that a
# JAX client still works under it, else stop it and train time-sliced.
if [ "$DEV" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import jax.numpy as jnp; print('MPS client ok', float(jnp.ones(3).sum()))"; then
    echo "MPS on"
  else
    echo "MPS not usable; training time-sliced"; echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
else
  echo "no MPS: training time-sliced"
fi
COMMON="--config.num_train_steps=1000000 --config.eval_every_steps=3000 --config.num_eval_images=200 --config.checkpoint_every_steps=100000 --config.log_every_steps=500 --config.tensorboard=off --config.input_workers=2 --config.num_sample_images=4 $TRAIN_EXTRA"
NONE="--config.norm=none"
TRAIN_S=$(( END_TRAIN - $(elapsed) ))
echo "training for $TRAIN_S s"
# A bare `wait` would also wait for the `tee` of the log (a process substitution, which
# bash 5.1+ waits for) and hang: wait for these PIDs only.
PIDS=""
start() {  # run directory name, flags...
  local name=$1; shift
  mkdir -p $R/$name
  timeout -k 40 -s TERM $TRAIN_S python3 -m sils_jax.main --config=$TRAIN_CONFIG --workdir=$R/$name $COMMON "$@" > $R/$name/train.log 2>&1 &
  PIDS="$PIDS $!"
}
start full_norm-none_seed0 $NONE --config.seed=0
start full_norm-none_seed1 $NONE --config.seed=1
start full_norm-none_seed2 $NONE --config.seed=2
start no_ss_norm-none_seed0 $NONE --config.lambda_intra="(0.0,0.0)" --config.lambda_inter=0.0
start no_cc_norm-none_seed0 $NONE --config.lambda_cycle_x=0.0 --config.lambda_cycle_layers="(0.0,0.0)"
start supervised_norm-none_seed0 $NONE --config.objective=supervised
# not the paper's batch 1: without BatchNorm a batch of 8 costs about as much per step
start full_norm-none_per-device-batch-size-8_seed0 $NONE --config.per_device_batch_size=8
wait $PIDS
echo "training stopped at $(elapsed) s"
tar czf "$OUT/runs.tgz" --exclude=checkpoints -C /tmp runs  # again below, with the evaluations
PIDS=""
for d in $R/*/; do
  (timeout -k 5 80 python3 -m sils_jax.evaluate --workdir=$d $EVAL_EXTRA > $d/evaluate.log 2>&1 || echo "evaluate $d failed") &
  PIDS="$PIDS $!"
done
wait $PIDS
echo "evaluations done at $(elapsed) s"
for d in $R/*/; do
  echo "== $d"; grep -h "steps/s" $d/train.log | tail -1; grep -h "eval step" $d/train.log | cut -c50- | tail -8
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('test (all):', m['step'], {k: round(v['mse100'], 4) for k, v in m['layers'].items()})" $d/eval/metrics.json 2>/dev/null
done
python3 -m sils_jax.reproduce --workdir=$R --summary || true
tar czf "$OUT/runs.tgz" --exclude=checkpoints -C /tmp runs
echo "all done at $(elapsed) s"
