# The two commands (see README): `make run` starts the agent with config.example.yaml;
# `make test` installs what the tests need and runs the whole suite (what .ci/run calls).
PYTHON ?= python3

.PHONY: run test install check lint typecheck unit bench proto

run:
	$(PYTHON) -m pip install -q --disable-pip-version-check -e . && $(PYTHON) -m agent run -c config.example.yaml

install:
	./scripts/install-test-deps

test: install lint typecheck
	$(PYTHON) -m pytest -q -p no:cacheprovider

lint:
	$(PYTHON) -m ruff check .

typecheck:
	$(PYTHON) -m mypy

unit:
	$(PYTHON) -m pytest -q -m "not integration"

bench:
	$(PYTHON) bench/run.py

proto:  # dev tool only: grpcio-tools pins an old protobuf, so it gets its own venv
	$(PYTHON) -m venv .venv-proto && .venv-proto/bin/pip install -q grpcio-tools==1.63.2
	.venv-proto/bin/python -m grpc_tools.protoc -I . --python_out=. exporters/prometheus_remote_write/remote.proto
	sed -i '1i # Regenerate from the repo root with `make proto` (grpcio-tools==1.63.2, protoc 26.1).' exporters/prometheus_remote_write/remote_pb2.py
