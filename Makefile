# The two commands of the README. Both install what they need first (torch pinned and first:
# an unpinned or other torch pulls a multi-GB CUDA build).
PY ?= python
NPROC ?= 2
CONFIG ?= configs/zero2.json

.PHONY: install demo test lint bench gpu-check

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.7.1 numpy
	$(PY) -m pip install -q -e ".[test,bench]"

# The main job: a small GPT trained on $(NPROC) CPU ranks with $(CONFIG).
demo: install
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m zeroshard.train --config $(CONFIG)

lint:
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_step.py

# On a CUDA machine: kernel tests on the GPU, update bandwidth vs HBM peak, stages 0-3 vs
# torch.optim, offload step time; writes bench/results/gpu_check.{json,png}. Without CUDA it
# says so and exits 0. Install first (`make install` takes PyPI's CUDA torch on a GPU host).
gpu-check:
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)
