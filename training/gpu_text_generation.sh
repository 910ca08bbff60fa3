#!/usr/bin/env bash
# Issue 15 on the GPU machine: several LSTM language models trained at once for a fixed time each,
# then scored alone and as mixtures (training/lm_ensemble.py), the best packed into $OUT as parts of
# at most 15 MiB (the device tool brings back at most 8 files of 16 MiB).
#
#   OUT=/tmp/out bash training/gpu_text_generation.sh            # on the GPU machine, from the repo root
#   cat $OUT/pack.tar.part-* | tar -x -C /tmp/tg-gpu                # here, then export each with
#   python -m training.text_generation ... --from-checkpoint /tmp/tg-gpu/NAME (the run's own flags)
#
# Settings: DATA (the folder with fra-eng.zip and cmn-eng.zip), MINUTES (training time per model),
# DEVICE, EXTRA (more flags for every run, e.g. --smoke for a rehearsal on the CPU), PACK_MB.
set -uo pipefail
: "${OUT:?set OUT}"
DATA=${DATA:-.gpu/data}
MINUTES=${MINUTES:-7}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
PACK_MB=${PACK_MB:-100}
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
for name in "${!flags[@]}"; do
  # shellcheck disable=SC2086
  python3 -m training.text_generation "${common[@]}" ${flags[$name]} $EXTRA --checkpoint "$RUNS/$name" \
    > "$RUNS/$name.log" 2>&1 &
done
wait
done_runs=()
for name in $(printf '%s\n' "${!flags[@]}" | sort); do
  echo "$name: ${flags[$name]}" >> "$RUNS/flags.txt"
  if [ -f "$RUNS/$name/checkpoint.pt" ]; then done_runs+=("$RUNS/$name"); else tail -5 "$RUNS/$name.log"; fi
done
[ ${#done_runs[@]} -gt 0 ] || { cp "$RUNS"/*.log "$OUT/" 2>/dev/null; exit 1; }
python3 -m training.lm_ensemble --data-dir "$DATA" --device "$DEVICE" --output "$RUNS/ensembles.json" "${done_runs[@]}"
RUNS=$RUNS PACK_MB=$PACK_MB python3 - <<'PY'
import json, os, tarfile
from pathlib import Path
import torch
runs, limit = Path(os.environ["RUNS"]), float(os.environ["PACK_MB"]) * 2**20
subsets = json.loads((runs / "ensembles.json").read_text())["subsets"]
singles = sorted((s for s in subsets if len(s["members"]) == 1), key=lambda s: s["validation_bits_per_character"])
order = [singles[0]["members"][0]]
order += sorted(subsets[0]["members"], key=lambda m: next(s["validation_bits_per_character"] for s in singles if s["members"] == [m]))
order += [s["members"][0] for s in singles]
chosen, size = [], 0
for name in dict.fromkeys(order):
    record = torch.load(runs / name / "checkpoint.pt", map_location="cpu", weights_only=True)
    record["state"] = {k: v.half() for k, v in record["state"].items()}  # halves the transfer; scored after
    torch.save(record, runs / name / "checkpoint.half.pt")
    bytes_ = (runs / name / "checkpoint.half.pt").stat().st_size
    if size + bytes_ <= limit:
        chosen.append(name)
        size += bytes_
print("packing", chosen, round(size / 2**20, 1), "MiB")
with tarfile.open(runs / "pack.tar", "w") as tar:
    for extra in ("ensembles.json", "flags.txt", "nvidia-smi.txt"):
        tar.add(runs / extra, arcname=extra)
    for log in runs.glob("*.log"):
        tar.add(log, arcname=log.name)
    for name in sorted(p.name for p in runs.iterdir() if (p / "summary.json").exists()):
        tar.add(runs / name / "summary.json", arcname=f"{name}/summary.json")
    for name in chosen:
        tar.add(runs / name / "tokenizer.json", arcname=f"{name}/tokenizer.json")
        tar.add(runs / name / "checkpoint.half.pt", arcname=f"{name}/checkpoint.pt")
PY
split -b 15M -d "$RUNS/pack.tar" "$OUT/pack.tar.part-"
ls -la "$OUT"
