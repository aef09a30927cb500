# Sourced (not run) by the gpu_*.sh scripts on a lent GPU machine, in the repository root: installs the
# wheels carried in .gpu/ (the device image lacks pycocotools) into /tmp/site, puts them and src/ on the
# Python path, and writes the GPU and torch versions to $1/gpu.txt (and the terminal).
if compgen -G ".gpu/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$1/gpu.txt"
