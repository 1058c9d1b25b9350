# The two commands a new user needs are `make demo` and `make test`; both prepare the machine
# first (scripts/bootstrap is idempotent).
PY := .venv/bin/python

.PHONY: setup demo test test-unit bench lint clean
setup:
	@scripts/bootstrap

demo: setup
	$(PY) -m ipshift demo

test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) -m ipshift bench

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy

clean:
	-$(PY) -m ipshift lab clean
