#!/usr/bin/env bash
# Rebuild the bundled model (titans_mlx/demo_model) with titans-mlx's own trainer, and measure it.
# Run from the repository root with the project's venv active. demo/README.md says what each step is for.
set -euo pipefail

OUT=${OUT:-demo/runs/recall}
BLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3   # the CLIs preload it themselves; the scripts here don't
[ -e "$BLAS" ] && export LD_PRELOAD="$BLAS"

# 1. the corpus (KJV, every 20th chapter held out) and the training mixture: KJV text + retrieval samples of 513 bytes
[ -e demo/data/train.txt ] || python demo/prepare_corpus.py --out demo/data     # needs: apt-get install -y bible-kjv
python demo/make_recall_mixture.py --corpus demo/data --out demo/data/mix512 --seq-len 512 --retrieval-ratio 2 --seed 1

# 2. training (2 CPU cores: about 70 minutes); after an interruption, the same command with --resume instead of --force
OPENBLAS_NUM_THREADS=2 python -m titans_mlx.train --config demo/recall_config.json --data demo/data/mix512 \
    --out "$OUT" --force --iters 800 --batch-size 8 --seq-len 512 --learning-rate 2e-3 --warmup 60 --grad-clip 0.5 \
    --prompt-loss-weight 0.1 --completion-loss-weight 10 --val-batches 8 --steps-per-eval 200 --steps-per-report 20 --save-every 100 --seed 0

# 3. what it recalls, with its memory learning and frozen (held-out chapters as the S-NIAH and BABILong haystack)
R=demo/results/recall_eval
python -m titans_mlx.evaluate --model "$OUT" --tasks passkey --lengths 1024,4096,16384,32768 \
    --depths 0,0.25,0.5,0.75,1 --samples 4 --ablation frozen-memory --out $R/passkey
python -m titans_mlx.evaluate --model "$OUT" --tasks niah --haystack demo/data/val.txt --lengths 1024,2048,4096,8192 \
    --depths 0,0.25,0.5,0.75,1 --samples 4 --ablation frozen-memory --out $R/niah
python -m titans_mlx.evaluate --model "$OUT" --tasks vt,babilong --haystack demo/data/val.txt --lengths 1024,4096 \
    --depths 0,0.5,1 --samples 4 --ablation frozen-memory --out $R/vt_babilong

# 4. still a language model: bits/byte on held-out chapters, this model and the one it replaces
python demo/valid_bpb.py --model "$OUT" --text demo/data/val.txt | tee demo/results/valid_bpb.jsonl
python demo/valid_bpb.py --model titans_mlx/demo_model --text demo/data/val.txt | tee -a demo/results/valid_bpb.jsonl
