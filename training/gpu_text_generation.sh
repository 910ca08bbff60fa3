#!/usr/bin/env bash
# Issue 15 on the GPU machine: several LSTM language models trained at once for a fixed time each,
# then scored alone and as mixtures (training/lm_ensemble.py), the best packed into $OUT as parts of
# at most 15 MiB (the device tool brings back at most 8 files of 16 MiB).
#
#   OUT=$OUT bash training/gpu_text_generation.sh     # on the GPU machine, from the repo root: the
#                                                     # device tool's run, timeout_s 590 (MINUTES 6 +
#                                                     # about 2 min before and after the training)
#   mkdir -p /tmp/tg-gpu && cat $FILES_AT/pack.tar.part-* | tar -x -C /tmp/tg-gpu        # here, then
#   python -m training.text_generation --data-dir ../shared/data/translation \
#       --from-checkpoint /tmp/tg-gpu/NAME --output-dir /tmp/tg-export --version 2
#   (the checkpoint brings its network, data and split settings; README: "Retraining")
#
# Settings: DATA (the folder with fra-eng.zip and cmn-eng.zip), MINUTES (training time per model),
# DEVICE, EXTRA (more flags for every run, e.g. --smoke for a rehearsal on the CPU), PACK_MB.
# $OUT gets at most 8 parts: the best single runs as soon as training ends, replaced by the best
# mixture's members once they are scored.
set -uo pipefail
: "${OUT:?set OUT}"
DATA=${DATA:-.gpu/data}
MINUTES=${MINUTES:-6}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
PACK_MB=${PACK_MB:-112}
RUNS=${RUNS:-/tmp/tg-runs}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import pydantic, tqdm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pydeps .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/pydeps${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf "$RUNS" && mkdir -p "$RUNS" "$OUT"
(nvidia-smi || true) > "$RUNS/nvidia-smi.txt" 2>&1
common=(--data-dir "$DATA" --extra-train cmn-eng.zip --device "$DEVICE" --threads 2 --time-budget-min "$MINUTES"
  --epochs 400 --batch-tokens 4096 --vocab-size 8000 --embed-dim 512)
declare -A flags=(
  [a]="--layers 2 --hidden 1024 --dropout 0.4 --input-dropout 0.5 --layer-dropout 0.3 --weight-drop 0.4 --lr 4e-3 --seed 1"
  [b]="--layers 2 --hidden 1024 --dropout 0.4 --input-dropout 0.5 --layer-dropout 0.3 --weight-drop 0.4 --lr 4e-3 --seed 2"
  [c]="--layers 2 --hidden 1280 --dropout 0.45 --input-dropout 0.55 --layer-dropout 0.35 --weight-drop 0.5 --lr 3e-3 --seed 3"
  [d]="--layers 3 --hidden 1024 --dropout 0.4 --input-dropout 0.5 --layer-dropout 0.3 --weight-drop 0.4 --lr 3e-3 --seed 4"
  [e]="--layers 2 --hidden 1024 --dropout 0.3 --input-dropout 0.35 --layer-dropout 0.25 --weight-drop 0.3 --lr 5e-3 --seed 5"
  [f]="--layers 2 --hidden 1536 --dropout 0.5 --input-dropout 0.6 --layer-dropout 0.4 --weight-drop 0.5 --lr 3e-3 --seed 6"
)
# Each run is bounded (a hung one costs only itself); the budget counts from the first batch.
limit=$(python3 -c "print(int($MINUTES * 60 + 240))")
for name in "${!flags[@]}"; do
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m training.text_generation "${common[@]}" ${flags[$name]} $EXTRA \
    --checkpoint "$RUNS/$name" > "$RUNS/$name.log" 2>&1 &
done
wait
for name in $(printf '%s\n' "${!flags[@]}" | sort); do
  echo "$name: ${flags[$name]}" >> "$RUNS/flags.txt"
done

# Packs the logs, every summary and the best checkpoints (fp16, at most PACK_MB) into $OUT as parts:
# ranked by the mixtures' validation figure when ensembles.json exists, else by each run's own.
pack() {
  RUNS=$RUNS PACK_MB=$PACK_MB python3 - <<'PY'
import json, os, tarfile
from pathlib import Path
import torch
runs, limit = Path(os.environ["RUNS"]), float(os.environ["PACK_MB"]) * 2**20
done = {p.parent.name: json.loads(p.read_text())["best"]["validation_bits_per_character"]
        for p in runs.glob("*/summary.json") if (p.parent / "checkpoint.pt").exists()}
order = sorted(done, key=done.get)
mixes = runs / "ensembles.json"
if mixes.exists():
    best_mix = json.loads(mixes.read_text())["subsets"][0]["members"]
    order = order[:1] + sorted(best_mix, key=done.get) + order
chosen, size = [], 0
for name in dict.fromkeys(order):
    half = runs / name / "checkpoint.half.pt"
    if not half.exists():
        record = torch.load(runs / name / "checkpoint.pt", map_location="cpu", weights_only=True)
        record["state"] = {k: v.half() for k, v in record["state"].items()}  # halves the transfer; scored after
        torch.save(record, half)
    if size + half.stat().st_size <= limit:
        chosen.append(name)
        size += half.stat().st_size
print("packing", chosen, "of", {k: round(v, 4) for k, v in sorted(done.items(), key=lambda kv: kv[1])},
      round(size / 2**20, 1), "MiB", flush=True)
with tarfile.open(runs / "pack.tar", "w") as tar:
    for extra in ("ensembles.json", "flags.txt", "nvidia-smi.txt"):
        if (runs / extra).exists():
            tar.add(runs / extra, arcname=extra)
    for log in runs.glob("*.log"):
        tar.add(log, arcname=log.name)
    for summary in runs.glob("*/summary.json"):
        tar.add(summary, arcname=f"{summary.parent.name}/summary.json")
    for name in chosen:
        tar.add(runs / name / "tokenizer.json", arcname=f"{name}/tokenizer.json")
        tar.add(runs / name / "checkpoint.half.pt", arcname=f"{name}/checkpoint.pt")
PY
  rm -f "$OUT"/pack.tar.part-*
  split -b 15M -d "$RUNS/pack.tar" "$OUT/pack.tar.part-"
}

pack  # the best single runs first: what comes back if the scoring below fails or the time runs out
done_runs=()
for name in $(printf '%s\n' "${!flags[@]}" | sort); do
  if [ -f "$RUNS/$name/checkpoint.pt" ]; then done_runs+=("$RUNS/$name"); else tail -5 "$RUNS/$name.log"; fi
done
if [ ${#done_runs[@]} -gt 1 ] && timeout 180 python3 -m training.lm_ensemble --data-dir "$DATA" --device "$DEVICE" \
    --output "$RUNS/ensembles.json" "${done_runs[@]}"; then
  pack
fi
ls -la "$OUT"
