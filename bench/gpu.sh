#!/usr/bin/env bash
# The GPU check of the speed issue (target 6), as one script of a few minutes: ViT-B/32 in
# float16 on CUDA, large batches; ingest end to end (gateway, Redis, Celery worker, Milvus
# Lite) against model-only on the same card, in one run.
#
# Needs the project installed with a CUDA torch (`make install TORCH_SPEC=torch`) and
# redis-server on PATH. NOT YET RUN: no session so far was lent a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
# 4,000 JPEGs: a GPU at ~1,500 img/s would finish 1,000 before the pipeline is warm.
BENCH_IMAGES=4000 "$PY" -m bench --full --only ingest --device cuda --dtype float16 --batch 256
