#!/bin/bash
# The real classification result of docs/classify.md: eo-learn's land-use set (forest / grassland /
# other, 13-band Sentinel-2 chips, spatial split). An eojax MAE pretrained on the set's three scenes,
# then linear probe, fine-tune and k-NN of its encoder, against the same ViT and a ResNet-18 from
# scratch; the majority class is in every eval (test_acc_* / count). Usage: scripts/eolearn_lulc_results.sh [OUT]
set -euo pipefail
OUT=${1:-/tmp/eojax_lulc}
export EOJAX_TEST_DATA=${EOJAX_TEST_DATA:-../shared/data}
SCENES=$(python -c "import os; from eojax.classify import data; print(os.path.dirname(data.eolearn_lulc_csv()))")/scenes
C=configs/classify.py:data=eolearn
eojax train --config=configs/mae.py:variant=mu --workdir="$OUT/mae" --config.input.paths="('$SCENES/*.tif',)" \
  --config.input.window=16 --config.input.eval_stride=16 --config.input.num_windows=4096 \
  --config.model.width=64 --config.model.depth=4 --config.model.heads=4 --config.model.mlp_dim=256 \
  --config.model.patch_size=2 --config.model.decoder_width=64 --config.model.decoder_depth=2 \
  --config.model.decoder_heads=4 --config.total_steps=1500 --config.batch_size=64 --config.eval_every=500 \
  --config.checkpoint_every=500 --config.optim.lr=1e-3 --config.optim.warmup_steps=100
eojax knn   --config=$C,encoder=mae --workdir="$OUT/knn_mae" --config.model.encoder_init="$OUT/mae"
eojax train --config=$C,encoder=mae,mode=linear_probe --workdir="$OUT/probe_mae" --config.model.encoder_init="$OUT/mae"
eojax train --config=$C,encoder=mae,mode=finetune --workdir="$OUT/finetune_mae" --config.model.encoder_init="$OUT/mae" \
  --config.optim.lr=1e-3
eojax train --config=$C,encoder=mae,mode=scratch --workdir="$OUT/scratch_vit" --config.optim.lr=1e-3
eojax train --config=$C,encoder=resnet,mode=scratch --workdir="$OUT/scratch_resnet18" --config.optim.lr=1e-3
for run in probe_mae finetune_mae scratch_vit scratch_resnet18; do
  python - "$OUT/$run/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["test"]
print(sys.argv[1].split("/")[-2], {k: round(v, 3) for k, v in r.items() if k in ("top1", "balanced_accuracy", "macro_f1")})
PY
done
python -c "import json; print('knn', json.load(open('$OUT/knn_mae/knn.json')))"
