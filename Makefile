# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test unit bench

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	.venv/bin/python -m pytest

unit: setup
	.venv/bin/python -m pytest test/unit

bench: setup
	.venv/bin/python bench/run.py
