# The two commands the README promises: `make run` and `make test`. Everything they need
# is installed by the targets below into .venv/ and node_modules/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
GENERATED := server/embedserve/v1/embedding_service_pb2.py
PROTOS := $(wildcard proto/embedserve/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: install proto lint test run bench clean lock

install: $(STAMP) $(GENERATED) node_modules/.stamp

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	touch $@

# Generated code is built from proto/ by this one command, never edited or committed.
proto $(GENERATED): $(PROTOS) tools/gen_proto.py $(STAMP)
	$(BIN)/python tools/gen_proto.py

node_modules/.stamp: package.json
	# buf is pinned exactly in package.json (its platform binaries by buf itself); npm 11 writes
	# lock files without the other platforms' optional packages, which then breaks `npm ci`.
	npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

lint: install
	npx --no-install buf lint
	npx --no-install buf format --diff --exit-code
	$(BIN)/ruff check server tests bench tools
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: install
	$(BIN)/python -m embedserve

bench: install
	$(BIN)/python bench/embed_bench.py

# Re-pins requirements.lock from a fresh environment (run after changing pyproject.toml).
lock:
	rm -rf /tmp/embedserve-lock && $(PYTHON) -m venv /tmp/embedserve-lock
	/tmp/embedserve-lock/bin/python -m pip install -q --upgrade pip
	/tmp/embedserve-lock/bin/python -m pip install -q -e '.[dev]'
	/tmp/embedserve-lock/bin/python -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) node_modules server/embedserve/v1 .mypy_cache .ruff_cache .pytest_cache
