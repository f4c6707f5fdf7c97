# diffcli — every target sets itself up on a fresh clone (they depend on the venv stamp).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev,plot]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffcli train recipes/digits.toml --out runs/demo --force
	$(BIN)/diffcli sample runs/demo/last.safetensors --sampler ddim --steps 50 --cfg 2.0 --n 100 --out runs/demo/samples --force
	@echo "grid: runs/demo/samples/grid.png"

# pytest exits 5 when it collects no test: fail loudly rather than pass an empty run.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: no tests collected" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''; rc=$$?; if [ $$rc -eq 5 ]; then exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/pip install -e '.[bench]'
	$(BIN)/python bench/train_digits.py

clean:
	rm -rf $(VENV) runs .pytest_cache
