#!/usr/bin/env bash
# Recall@10 vs QPS on GloVe-50 (400K real vectors, cosine): our Numba engine against faiss's
# IndexIVFPQ on the same codes and faiss's IVF,PQx4fs FastScan, at 1 and 2 threads.
# Prints every row and the QPS ratios; writes JSON and a plot under $RUNS (default runs/).
set -euo pipefail
RUNS=${RUNS:-runs}
PYTHON=${PYTHON:-python3}
INDEX=$RUNS/glove-50
if [ ! -f "$INDEX/manifest.json" ]; then
    "$PYTHON" -m chameleon index build --dataset glove-50 --out "$INDEX" --nlist 1024 --m 25
fi
"$PYTHON" -m chameleon index info "$INDEX"
"$PYTHON" -m chameleon bench recall --dataset glove-50 --index "$INDEX" \
    --engines numba,faiss-ivfpq,faiss-fastscan --nprobe 1,2,4,8,16,32,64 --k 10 --threads 1,2 \
    --json "$RUNS/glove-50-recall.json" --plot "$RUNS/glove-50-recall.png"
