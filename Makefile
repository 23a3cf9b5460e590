.PHONY: install demo test bench lint clean
PY := .venv/bin/python

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m launch.cli demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/calibration.py

lint: install
	$(PY) -m ruff check calibrl actors launch tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
