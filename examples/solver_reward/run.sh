#!/usr/bin/env bash
# PPO driven by an external evaluator process (a solver), no reward model:
#   make_data -> SFT -> PPO (--reward-cmd evaluator.py) -> held-out accuracy of the SFT and PPO policies.
#
#   bash examples/solver_reward/run.sh [RUN]        # RUN defaults to runs/solver
#
# Run from anywhere; paths are relative to the repository root. Uses .venv/bin (override with
# LOWMEM_RLHF=/path/to/lowmem-rlhf PYTHON=/path/to/python). Rerunning replaces RUN's stages.
# Wall seconds of each step go to RUN/times.txt and are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=${1:-runs/solver}
CLI=${LOWMEM_RLHF:-.venv/bin/lowmem-rlhf}
PY=${PYTHON:-.venv/bin/python}
DATA=$RUN/data
PY=$(command -v "$PY") || { echo "run.sh: no python at ${PYTHON:-.venv/bin/python}; run bash scripts/setup.sh" >&2; exit 2; }
abs() { "$PY" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
PY=$(abs "$PY")

mkdir -p "$RUN"
: > "$RUN/times.txt"
step() {  # step NAME CMD...: run it, log its wall time
    local name=$1 t0 t1
    shift
    echo "== $name: $*"
    t0=$(date +%s)
    "$@"
    t1=$(date +%s)
    printf '%-6s %5d s\n' "$name" "$((t1 - t0))" | tee -a "$RUN/times.txt"
}

step data "$PY" examples/solver_reward/make_data.py --out "$DATA"
# the evaluator process and its answer key, as one command line (absolute paths, quoted for the
# shell-like split PPO and eval do)
EVALUATOR=$("$PY" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' \
    "$PY" "$(abs examples/solver_reward/evaluator.py)" --key "$(abs "$DATA/answers.jsonl")")

# SFT shows one phrasing per relation (160 stories -> equations), 2 epochs
step sft "$CLI" sft --data "$DATA/sft.jsonl" --out "$RUN" --overwrite --save-every 0 \
    --max-steps 40 --batch 8 --max-len 96 --lr 5e-4 --eval-fraction 0.05

# PPO on stories in every phrasing; the solver's verdict is the only reward. 8 stories x 4 samples
# per rollout: right and wrong equations for the same story are compared in the advantages.
step ppo "$CLI" ppo --prompts "$DATA/prompts.jsonl" --out "$RUN" --sft "$RUN/sft" --overwrite --save-every 0 \
    --reward-cmd "$EVALUATOR" \
    --iterations 12 --rollout-batch 32 --samples-per-prompt 4 --response-len 16 --prompt-len 96 \
    --ppo-epochs 2 --minibatches 4 --lr 2e-4 --kl-coef 0.02 --temperature 1.0

# greedy equations of the SFT policy and of the PPO policy for the held-out stories, scored by
# the same evaluator process (1 only when the equation's solution is the story's answer)
step eval "$CLI" eval "$RUN" --prompts "$DATA/heldout.jsonl" --reward-cmd "$EVALUATOR" --max-new-tokens 16 --batch 32

echo "== wall seconds per step ($RUN/times.txt)"
cat "$RUN/times.txt"
echo "== held-out accuracy by phrasing and relation"
"$PY" examples/solver_reward/breakdown.py "$RUN/eval/heldout"
