# Two entry points (see README): `make walkthrough` runs every notebook at its default budget and writes figures/;
# `make test` runs the test suite. Both create .venv and install the project first when needed.
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

# Two notebooks at a time where the runner's store allows it: 00 first (its runs are the others' baselines), then
# 01 -> 03 beside 02 -> 04 (neither lane trains a run the other reads, so every notebook prints what it would in
# order), then 05 (it gathers the verdicts of 01-04) and 06 (it reads 05's runs). Each notebook's workers fill the
# cores while the other one imports, evaluates or draws. A notebook added later needs its line here.
RUNS := $(NOTEBOOKS:.ipynb=.run)
.PHONY: $(RUNS)

walkthrough: install
	@$(MAKE) --no-print-directory -j2 $(RUNS)

notebooks/01_clipood.run notebooks/02_robust_ft_swa.run: notebooks/00_shapeworld_and_the_problem.run
notebooks/03_arf_anchors.run: notebooks/01_clipood.run
notebooks/04_saft.run: notebooks/02_robust_ft_swa.run
notebooks/05_comparison.run: notebooks/03_arf_anchors.run notebooks/04_saft.run
notebooks/06_beyond.run: notebooks/05_comparison.run

$(RUNS): %.run:
	@echo "== $*.ipynb"; start=$$(date +%s); log=$$(mktemp); \
	$(BIN)/papermill --cwd notebooks $*.ipynb $*.ipynb -p budget default > $$log 2>&1 || \
		{ cat $$log; rm -f $$log; exit 1; }; \
	rm -f $$log; echo "   $*.ipynb: $$(( $$(date +%s) - start )) s"

# pytest-xdist: one process per CPU, each on one torch thread (the tests' models are tiny, and a notebook kernel's
# start is mostly single-threaded imports); --dist loadfile keeps a file's (a notebook's) tests in one process.
test: install
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider -n auto --dist loadfile
