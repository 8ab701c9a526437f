# One task runner for people and CI. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help demo install dev test lint typecheck pytest bench bench-throughput bench-steps bench-kafka bench-observability clean research

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/tidings:
	@echo "Setting up: creating $(VENV) and installing Tidings with pip (a minute or so the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .

install: $(BIN)/tidings  ## Create .venv and install Tidings

demo: install  ## Install and run the fraud-detection example on the embedded bus (Ctrl-C stops)
	$(BIN)/tidings run examples.fraud:app

research: install  ## Run the research-assistant example (tools, journaled LLM steps, progress)
	$(BIN)/tidings run examples.research:app

dev: install  ## Install the test and lint tools (and the PostgreSQL driver)
	@echo "Installing the test and lint tools with pip..."
	$(BIN)/pip install --quiet -e '.[dev]'

lint: dev  ## ruff (lint + format check)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev  ## mypy --strict on the package
	$(BIN)/mypy

pytest: dev  ## The test suite (needs PostgreSQL at 127.0.0.1:5432; starts its own nats-server)
	$(BIN)/pytest

test: lint typecheck pytest  ## Install everything, then lint, type-check and run every test

bench: dev  ## Tidings against raw nats-py and FastStream, side by side (benchmarks/contenders.py)
	$(BIN)/python benchmarks/contenders.py --install-faststream

bench-throughput: dev  ## The older throughput and latency rows (benchmarks/throughput.py)
	$(BIN)/python benchmarks/throughput.py

bench-steps: dev  ## Overhead of a journaled step and a bus tool call against a direct call
	$(BIN)/python benchmarks/steps.py

bench-kafka: dev  ## Tidings on Kafka (a tansu broker) against raw aiokafka and confluent-kafka
	$(BIN)/python benchmarks/kafka_throughput.py

bench-observability: dev  ## Throughput with metrics and tracing on, against both off
	$(BIN)/python benchmarks/observability.py

clean:  ## Remove the virtualenv and local data
	rm -rf $(VENV) .tidings .mypy_cache .ruff_cache .pytest_cache
