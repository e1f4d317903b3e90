#!/bin/sh
# The SmolLM2 fine-tuning runs of docs/llm.md, most important first, one process with one thread
# (resumable: rerun to continue; finished runs are skipped). Usage: sh benchmarks/llm/run.sh
set -e
export GLUE_DIR="${GLUE_DIR:-../shared/data/glue}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for grid in smollm2-sst2 smollm2-bbc smollm2-sst2-more; do
    python -m kronpeft study "benchmarks/llm/$grid.toml" --parallel 1 --threads 1
done
