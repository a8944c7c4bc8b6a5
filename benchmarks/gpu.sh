#!/usr/bin/env bash
# The CUDA paths and the Visium-sized table on a GPU machine, as one prepared script:
#   bash benchmarks/gpu.sh OUTDIR [FRACTION] [PRECISION]
# 1. torchrun (DDP, one rank on cuda:LOCAL_RANK) `histosr run` of a small synthetic section;
# 2. benchmarks/visium_table.py on the GPU (FRACTION of the published epochs, default 1;
#    PRECISION fp32 or bf16 where the method has the switch), one JSON line per method.
# Needs histosr's dependencies importable (PYTHONPATH=src plus anndata, zarr, pydantic...).
set -u
OUT=${1:?usage: gpu.sh OUTDIR [FRACTION] [PRECISION]}
FRAC=${2:-1}
PREC=${3:-fp32}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import torch, histosr
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("bf16", torch.cuda.is_bf16_supported())
from histosr.simulate import synthetic_visium
from histosr.io import write_istar
write_istar(synthetic_visium(seed=3, size_um=800), "/tmp/gpu_sec")
import yaml
yaml.safe_dump({"section": {"reader": "istar", "path": "/tmp/gpu_sec"},
                "method": {"name": "istar", "params": {"epochs": 50, "n_states": 2,
                                                        "device": "cuda"}},
                "genes": {"n_top": 50}, "seed": 0, "out": "/tmp/gpu_ddp"},
               open("/tmp/gpu_cfg.yaml", "w"))
PY
t0=$(date +%s)
python3 -m torch.distributed.run --nproc_per_node 1 -m histosr --quiet run /tmp/gpu_cfg.yaml \
  > "$OUT/ddp.txt" 2>&1
echo "torchrun rc=$? seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/ddp.txt"
python3 -c "import json; r=json.load(open('/tmp/gpu_ddp/report.json')); print({k: r['timings_s'].get(k) for k in ('features','fit','predict')}, r['metrics'].get('in_sample_spot_pcc_mean'))" \
  | tee -a "$OUT/ddp.txt"
python3 benchmarks/visium_table.py --device cuda --precision "$PREC" --epochs-fraction "$FRAC" \
  --methods istar deephex histex --out /tmp/vt --cache /tmp/vt/cache 2>&1 | tee "$OUT/visium_gpu.txt"
