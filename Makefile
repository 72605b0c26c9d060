# trainorch-jupyter: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on disk on these machines; pip takes it through the pin in constraints.txt.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_INSTALL := $(PIP) install --disable-pip-version-check -q -c constraints.txt $(FIND_LINKS)

.PHONY: venv install demo test test-fast bench lab lint clean labextension

# Shipped alone to bare images (runner.py) or inside the start command (stage-0): they must run on Python 3.9.
PY39_FILES := trainorch_jupyter/runner.py trainorch_jupyter/remote/stage0_program.py
# The trainer runs on the training machine's python3 (Lambda Stack: 3.10) with only the package root on the way.
PY310_FILES := trainorch_jupyter/__init__.py trainorch_jupyter/trainer
CHECK_PY39 := $(PY) -m ruff check --target-version py39 --extend-ignore RUF100 $(PY39_FILES) && \
	$(VENV)/bin/vermin -t=3.9- --no-tips --violations $(PY39_FILES) && \
	$(VENV)/bin/vermin -t=3.10- --no-tips --violations $(PY310_FILES)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

venv install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m trainorch_jupyter.demo

test: $(VENV)/.installed labextension
	sh .ci/ensure-chromium
	$(PY) -m ruff check trainorch_jupyter tests benchmarks
	$(CHECK_PY39)
	$(PY) -m mypy
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# The JupyterLab extension (src/, TypeScript) built with jlpm and @jupyter/builder into $(LABEXT_DIR), and linked
# into the venv's JupyterLab (what `jupyter labextension develop` does). Wheels build it through the hatch build hook;
# an editable install (`make install`) skips that unless TRAINORCH_BUILD_LABEXTENSION=1, so `make demo` needs no Node.
LABEXT_DIR := trainorch_jupyter/labextension
LABEXT_LINK := $(VENV)/share/jupyter/labextensions/trainorch-jupyter
JLPM := PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/jlpm

labextension: $(LABEXT_DIR)/package.json
	rm -rf $(LABEXT_LINK) && mkdir -p $(dir $(LABEXT_LINK)) && ln -s $(abspath $(LABEXT_DIR)) $(LABEXT_LINK)

$(LABEXT_DIR)/package.json: $(VENV)/.installed package.json yarn.lock .yarnrc.yml tsconfig.json $(wildcard src/*.ts style/*)
	@command -v node >/dev/null || { echo "labextension: Node.js >= 20 is needed to build the JupyterLab extension" >&2; exit 1; }
	$(JLPM) install --immutable
	$(JLPM) build:prod

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run

lab: $(VENV)/.installed labextension
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

lint: $(VENV)/.installed
	$(PY) -m ruff check trainorch_jupyter tests benchmarks
	$(CHECK_PY39)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis test-artifacts node_modules lib tsconfig.tsbuildinfo .yarn trainorch_jupyter/labextension
