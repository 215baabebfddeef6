.PHONY: install test lint format quickstart bench

install:
	python -m pip install torch==2.13.0 -e '.[dev]'

test:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

quickstart:
	etrm quickstart

bench:
	python benchmarks/bench_data.py
	python benchmarks/bench_eval.py
	python benchmarks/bench_train_step.py
	python benchmarks/bench_kernels.py
