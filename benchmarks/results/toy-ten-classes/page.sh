#!/usr/bin/env bash
# Writes docs/results-ten.md from the rows in this folder (no training, no images; seconds).
# Run from the repository root: bash benchmarks/results/toy-ten-classes/page.sh
set -euo pipefail
R=benchmarks/results/toy-ten-classes
PY=${PY:-.venv/bin/python}
ATTN="per_layer/direct+r4+adv0.5+attn_all+cosine+sat+s800"
TR="per_layer/direct+r4+adv0.5+sat"
$PY benchmarks/compare_methods.py --targets circle,square,triangle,diamond,cross,ring,star,heart,crescent,arrow \
  --multi '' --steps 400 --per-class 50 --variants "$ATTN,$ATTN@1.5,$ATTN@2,$TR,$TR@2,$TR+eta0.25,shared/direct,shared/direct+attn_ff,per_layer/direct+attn_ff" \
  --baselines negative_prompt,uce,esd_x,esd_u,spm,spm@2 --threads 1 --out $R/ten --cached-only \
  --single-also $R/hard --single-also $R/val777 --single-also $R/seed0 --single-also $R/seed1 --single-also $R/seed2 \
  --single-also $R/s3seed0 --single-also $R/s3seed1 --single-also $R/s3seed2 \
  --single-also $R/hs3seed0 --single-also $R/hs3seed1 --single-also $R/hs3seed2 \
  --over-seeds $R/s3seed0,$R/s3seed1,$R/s3seed2 --over-seeds $R/hs3seed0,$R/hs3seed1,$R/hs3seed2 \
  --over-seeds $R/seed0,$R/seed1,$R/seed2 \
  --docs docs/results-ten.md --title "Every toy class as the target, three training seeds and the harder generality set: UnHype against the baselines" \
  --note "$(cat $R/note.txt)"
