#!/usr/bin/env bash
# Train the recall model with titans-mlx's own trainer (no titans-pytorch in the loop), and measure it.
# Run from the repository root with the project's venv active. demo/README.md says what each step is for.
set -euo pipefail

OUT=${OUT:-demo/runs}
BLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3   # the CLIs preload it themselves; the scripts here don't
[ -e "$BLAS" ] && export LD_PRELOAD="$BLAS"

# 1. the corpus (KJV, every 20th chapter held out) and the three stages' data
[ -e demo/data/train.txt ] || python demo/prepare_corpus.py --out demo/data     # needs: apt-get install -y bible-kjv
# stage 1: passkey samples only, 256-384 bytes (the setting of the titans-pytorch probe that learned passkeys)
python demo/make_recall_mixture.py --out demo/data/passkey384 --seq-len 384 --min-len 256 \
    --tasks passkey --samples 20000 --no-text
# stage 2: every training chapter as text, plus as many retrieval samples of 400-640 bytes (passkey, S-NIAH-1 in
# training chapters and in RULER's noise)
python demo/make_recall_mixture.py --corpus demo/data --out demo/data/stage2 --seq-len 640 --min-len 400 \
    --tasks passkey,niah_kjv,niah_noise --retrieval-ratio 1 --seed 2
# stage 3: the same tasks at 1,024-2,048 bytes, 4,000 retrieval samples beside the 1,927 text windows
python demo/make_recall_mixture.py --corpus demo/data --out demo/data/stage3 --seq-len 2048 --min-len 1024 \
    --tasks passkey,niah_kjv,niah_noise --samples 4000 --seed 3

# 2. stage 1 from scratch (2 CPU cores: about 30 minutes): the loss on the answer, 0.1 on the rest
python -m titans_mlx.train --config demo/passkey_probe_config.json --data demo/data/passkey384 --out "$OUT/probe" \
    --force --iters 1500 --batch-size 16 --seq-len 384 --prompt-loss-weight 0.1 --completion-loss-weight 1 \
    --learning-rate 2e-3 --warmup 30 --lr-schedule constant --grad-clip 0.5 --val-batches 4 --steps-per-eval 250 \
    --steps-per-report 10 --save-every 50 --seed 0
python demo/teacher_forced.py --model "$OUT/probe" --lengths 256,1024,2048,4096 --samples 24

# 3. stage 2 from stage 1's weights (about 70 minutes): the language model back, the other tasks in
python -m titans_mlx.train --model "$OUT/probe" --data demo/data/stage2 --out "$OUT/stage2" --force --iters 2000 \
    --batch-size 16 --seq-len 640 --prompt-loss-weight 0.1 --completion-loss-weight 5 --learning-rate 1.5e-3 \
    --warmup 20 --lr-schedule cosine --grad-clip 0.5 --val-batches 8 --steps-per-eval 250 --steps-per-report 10 \
    --save-every 50 --seed 1

# 4. stage 3 from stage 2's weights (about 75 minutes): needles up to 2K bytes back, so that holding them pays
python -m titans_mlx.train --model "$OUT/stage2" --data demo/data/stage3 --out "$OUT/stage3" --force --iters 600 \
    --batch-size 8 --seq-len 2048 --prompt-loss-weight 0.1 --completion-loss-weight 5 --learning-rate 1e-3 \
    --warmup 20 --lr-schedule cosine --grad-clip 0.5 --val-batches 4 --steps-per-eval 200 --steps-per-report 10 \
    --save-every 50 --seed 3
# after an interruption, any stage's command again with --resume instead of --force

# 5. what it recalls, with its memory learning and frozen (held-out chapters as the S-NIAH and BABILong haystack)
R=demo/results/recall_model
python -m titans_mlx.evaluate --model "$OUT/stage3" --tasks passkey --lengths 1024,4096,16384,32768 \
    --depths 0,0.25,0.5,0.75,1 --samples 4 --ablation frozen-memory --out $R/passkey | tee $R/passkey.txt
python -m titans_mlx.evaluate --model "$OUT/stage3" --tasks niah --haystack demo/data/val.txt \
    --lengths 1024,2048,4096,8192 --depths 0,0.25,0.5,0.75,1 --samples 4 --ablation frozen-memory --out $R/niah \
    | tee $R/niah.txt
python -m titans_mlx.evaluate --model "$OUT/stage3" --tasks vt,babilong --haystack demo/data/val.txt \
    --lengths 1024,4096 --depths 0,0.5,1 --samples 4 --ablation frozen-memory --out $R/vt_babilong \
    | tee $R/vt_babilong.txt

# 6. still a language model: bits/byte on held-out chapters, this model and the demo model
python demo/valid_bpb.py --model "$OUT/stage3" --text demo/data/val.txt | tee $R/valid_bpb.jsonl
python demo/valid_bpb.py --model titans_mlx/demo_model --text demo/data/val.txt | tee -a $R/valid_bpb.jsonl

# 7. ship it: the model files only (the card, titans_mlx/recall_model/README.md, lives in git)
cp "$OUT"/stage3/{config.json,model.safetensors,titans_model.py,tokenizer.json,tokenizer_config.json} \
    titans_mlx/recall_model/
