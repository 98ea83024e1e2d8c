#!/bin/bash
# One session on a lent GPU machine (jax, flax, optax, orbax, chex and torch there;
# no TensorFlow, no network). Run from the repo root, with the wheels of clu,
# ml-collections and dm-pix in .whl/ (see the device notes in benchmarks/README.md):
#
#   bash benchmarks/device_run.sh [END_TRAIN_S [BENCH_S]]
#
# 1. GPU benchmarks of the training step, JAX and the PyTorch peer on the same GPU
#    (benchmarks/train_step.py, benchmarks/torch_reference.py), time-boxed to BENCH_S.
# 2. The synthetic experiments of RESULTS.md trained side by side on the one GPU until
#    END_TRAIN_S seconds after the start, stopped with SIGTERM (the loop saves a
#    checkpoint and exits), then each evaluated on the 1000 test triplets.
# Everything lands in $OUT (or /tmp/device_out): bench.jsonl, runs.tgz, log.txt.
# Budget: END_TRAIN_S + ~90 s (evaluation, archive) for the whole command; run it with
# timeout_s >= END_TRAIN_S + 120. On 2026-11-27 it ran as `device_run.sh 265 150` under a
# 330 s limit: the benchmarks finished (results/h200_2026-11-27.jsonl) but the limit
# cut the training runs before their evaluation.
set -u
T0=$(date +%s)
END_TRAIN=${1:-450}  # seconds after start at which training is stopped
BENCH_S=${2:-150}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
elapsed() { echo $(( $(date +%s) - T0 )); }

# --- 1. benchmarks, time-boxed to BENCH_S so training keeps its share ------------
B=$OUT/bench.jsonl
timeout $BENCH_S bash -c "
python3 benchmarks/train_step.py --config=configs/synthetic.py --batch=1,8,64 --steps=30 >> $B || echo 'jax fp32 bench failed';
for b in 1 8 64; do python3 benchmarks/torch_reference.py --device=cuda --image_size=128 --batch=\$b --steps=30 --warmup=5 >> $B || echo torch eager b\$b failed; done;
python3 benchmarks/train_step.py --config=configs/synthetic.py --batch=64 --steps=30 --dtype=bfloat16 >> $B || echo 'jax bf16 bench failed'
" || echo "benchmarks stopped at the time box ($BENCH_S s)"
echo "benchmarks done at $(elapsed) s"; cat "$B"

# --- 2. training runs, side by side on the one GPU -------------------------------
TRAIN_S=$(( END_TRAIN - $(elapsed) ))
echo "training for $TRAIN_S s"
R=/tmp/runs
mkdir -p $R
COMMON="--config.num_train_steps=1000000 --config.eval_every_steps=2500 --config.num_eval_images=200 --config.checkpoint_every_steps=10000 --config.log_every_steps=500 --config.tensorboard=off"
start() {  # name, extra flags...
  local name=$1; shift
  mkdir -p $R/$name
  timeout -s TERM $TRAIN_S python3 -m sils_jax.main --config=configs/synthetic.py --workdir=$R/$name $COMMON "$@" > $R/$name/train.log 2>&1 &
}
start full_seed0 --config.seed=0
start no_ss_seed0 --config.lambda_intra="(0.0,0.0)" --config.lambda_inter=0.0
start no_cc_seed0 --config.lambda_cycle_x=0.0 --config.lambda_cycle_layers="(0.0,0.0)"
start supervised_seed0 --config.objective=supervised
wait
echo "training stopped at $(elapsed) s"
for d in $R/*/; do
  (python3 -m sils_jax.evaluate --workdir=$d > $d/evaluate.log 2>&1 || echo "evaluate $d failed") &
done
wait
echo "evaluations done at $(elapsed) s"
for d in $R/*/; do
  echo "== $d"; grep -h "steps/s" $d/train.log | tail -1; cat $d/eval/metrics.json 2>/dev/null | head -30
done
tar czf "$OUT/runs.tgz" --exclude=checkpoints -C /tmp runs
echo "all done at $(elapsed) s"
