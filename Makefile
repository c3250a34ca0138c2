# Two entry points (see README): `make walkthrough` runs every notebook at its default budget and writes
# figures/; `make test` runs the test suite. Both create .venv and install the project first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: install walkthrough test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

walkthrough: install
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		$(BIN)/papermill --cwd notebooks $$nb $$nb -p budget default --progress-bar || exit 1; \
		echo "   $$(( $$(date +%s) - start )) s"; \
	done

# pytest-xdist: one process per CPU, each on one torch thread (the tests' models are tiny, and a notebook kernel's
# start is mostly single-threaded imports); --dist loadfile keeps a file's (a notebook's) tests in one process.
test: install
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider -n auto --dist loadfile
