#!/usr/bin/env bash
# Rebuild the bundled demo model (titans_mlx/demo_model) as it was made: ~62 min of training on two CPU cores.
# Needs Debian's bible-kjv (the corpus), a python with titans-pytorch 0.5.5 + torch for training (TP_PYTHON), and one
# with this package for conversion (PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
TP=${TP_PYTHON:-/work/venv-tp/bin/python}
PY=${PYTHON:-python}

command -v bible >/dev/null || apt-get install -y bible-kjv
$PY demo/prepare_corpus.py --out demo/data
$TP demo/train_demo.py --out demo/runs/kjv --steps 1500 --minutes 62 --threads 2
$PY -m convert --torch-path demo/runs/kjv/model.pt --config demo/runs/kjv/config.json \
    --mlx-path titans_mlx/demo_model --dtype float32 --tokenizer bytes --force
git checkout -- titans_mlx/demo_model/README.md  # --force replaced the directory; the model card lives in git
$TP demo/check_conversion.py --torch demo/runs/kjv --mlx titans_mlx/demo_model
$PY demo/eval_memory.py --mlx titans_mlx/demo_model --gaps 1024,2048,4096 --trials 12 --out demo/results/memory_eval.json \
    | tee demo/results/memory_eval.txt
$TP demo/eval_memory.py --torch demo/runs/kjv --gaps 256 --trials 12 --ablation --out demo/results/memory_eval_torch.json \
    | tee demo/results/memory_eval_torch.txt
(cd demo && $TP probe_selective_writes.py --torch runs/kjv --gaps 1024,4096 | tee results/selective_writes.txt)
