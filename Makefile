VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: venv test check lint types run bench

venv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q '.[dev]'

test: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check gomail tests bench

types: venv
	$(VENV)/bin/mypy gomail

check: lint types test

run: venv
	$(VENV)/bin/gomail server --log-format text

bench: venv
	$(PY) bench/http_ingest
	$(PY) bench/smtp_throughput
	$(PY) bench/smtp_tls
	$(PY) bench/delivery_throughput
