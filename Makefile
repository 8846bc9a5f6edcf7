# The two commands a new user needs:
#   make nightly   runs the nightly pipeline on the embedded sample data (local mode)
#   make test      runs the whole test suite
# Both create .venv with the pinned dependencies on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATE ?= 2011-12-09

.PHONY: nightly test venv zip clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/.installed

nightly: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" ./spark-submit.sh jobs/nightly.py --config conf/local.toml --date $(DATE)

test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# dist/mf_spark.zip, for schedulers that call spark-submit themselves (docs/operations.md)
zip:
	./spark-submit.sh --zip-only

clean:
	rm -rf dist output .pytest_cache build
