#!/usr/bin/env bash
# One full-data RTE run per method with all-MiniLM-L6-v2: a first look, not the study.
# Resumable: a method whose runs/rte/<method>/metrics.json exists is skipped; one with a
# checkpoint is continued with --resume. Run in the background:
#   nohup benchmarks/rte_sweep.sh > runs/rte/sweep.log 2>&1 &
# then `python benchmarks/rte_table.py > docs/results-rte.md`.
set -u
cd "$(dirname "$0")/.."
KRONPEFT=${KRONPEFT:-.venv/bin/kronpeft}
GLUE_DIR=${GLUE_DIR:-../shared/data/glue}
METHODS=${METHODS:-"krona lokr kronab kronab-res adakron bottleneck lora full"}
EPOCHS=${EPOCHS:-1}
MAXLEN=${MAXLEN:-64}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the box is shared: one thread per run avoids oversubscription
mkdir -p runs/rte
for method in $METHODS; do
  out=runs/rte/$method
  if [ -f "$out/metrics.json" ]; then echo "skip $method (done)"; continue; fi
  if [ -f "$out/checkpoint/state.json" ]; then mode=--resume; else mode=--overwrite; fi
  echo "== $method ($mode) $(date +%T)"
  "$KRONPEFT" train --task rte --method "$method" --data-dir "$GLUE_DIR" --output-dir "$out" $mode \
    --epochs "$EPOCHS" --batch-size 32 --max-length "$MAXLEN" --seed 0 --log-every 5 \
    > "runs/rte/$method.log" 2>&1 || echo "!! $method failed: $(tail -1 runs/rte/$method.log)"
  tail -3 "runs/rte/$method.log"
done
echo "sweep done $(date +%T)"
