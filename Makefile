# Every target installs first when needed, so a fresh clone needs nothing but `make test` or `make train`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PROTOC  := $(PY) -m grpc_tools.protoc

.PHONY: install test lint proto train eval bench gpu-check gpu-carry clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# ---------------------------------------------------------------------------------------------------
# Experiments: one engine (runner/experiments/) runs any folder prototxt/$(EXP)/ (its experiment.prototxt
# names the data stages, runs, snapshot rule and scales; every value is in that folder's prototxts).
#   make train [EXP=mnist] [SCALE=demo]   data stages + the TRAIN runs (pre-training)  -> runs/$(EXP)/$(SCALE)/
#   make eval  [EXP=mnist] [SCALE=demo]   the EVAL runs (fine-tuning, probes), results.md/.csv and plots
#   EXP=kitti KITTI_DIR=…                 KITTI odometry pre-training (KITTI-EGO, KITTI-SFA)
#   EXP=transfer SUN_DIR=… IMAGENET_DIR=… SUN-397 layer probes and ImageNet fine-tuning of the KITTI snapshots
#   EXP=my_copy                           a copy of a folder, edited
# SCALE: demo (default), full (the thesis's schedule), smoke (seconds; tests), or any scale the folder defines.
# RUNS=, DATA= move the runs/ and data/ folders. THREADS=N (default 1) threads per training; JOBS=N trainings
# side by side (default: usable CPUs / THREADS): JOBS never changes a number, THREADS changes the last bits.
# GPU=0 (0,1 / all) trains on GPUs.
# An interrupted target resumes each run from its newest snapshot when run again.
# MNIST comes from MNIST_DIR (default: ../shared/data/mnist when present), else the cache or a download.
# ---------------------------------------------------------------------------------------------------
EXP       ?= mnist
SCALE     ?= demo
JOBS      ?=
THREADS   ?= 1
MNIST_DIR ?= $(wildcard $(abspath ../shared/data/mnist))
export MNIST_DIR KITTI_DIR SUN_DIR IMAGENET_DIR
EXPERIMENT := $(PY) -m runner.experiments
RUNS      ?= runs
DATA      ?= data
EXP_FLAGS   = $(EXP) --scale $(SCALE) --threads $(THREADS) $(if $(JOBS),--jobs $(JOBS)) --runs $(RUNS) --data $(DATA) $(if $(GPU),--gpu $(GPU))

train: $(STAMP)
	$(EXPERIMENT) train $(EXP_FLAGS)

eval: $(STAMP)
	$(EXPERIMENT) eval $(EXP_FLAGS)

lint: $(STAMP)
	$(PY) -m ruff check .

proto: $(STAMP)
	$(PROTOC) -I converter --python_out=converter converter/caffe.proto converter/experiment.proto
	sed -i 's/^import caffe_pb2/from converter import caffe_pb2/' converter/caffe_pb2.py converter/experiment_pb2.py

# All measurements, each writing benchmarks/results/<name>.{md,json} and printing one JSON line: the GEMM
# peak of the machine; converted CaffeNet vs hand-written PyTorch on the timing nets and AlexNet build time;
# the MNIST pair generator and egomotion training speed, the data path alone, two jobs sharing the CPUs, and
# the profile of one iteration; the KITTI pair
# generator; ONNX Runtime feature extraction; 10,000 fuzz cases per reader. Last, benchmarks/report.py
# collects them into BENCHMARKS.md. BENCH_FLAGS=--quick: fewer KITTI-net iterations.
bench: $(STAMP)
	$(PY) benchmarks/gemm_peak.py
	$(PY) benchmarks/bench_converter.py $(BENCH_FLAGS)
	$(PY) benchmarks/bench_mnist.py
	$(PY) benchmarks/bench_data_path.py
	$(PY) benchmarks/bench_shared.py
	$(PY) benchmarks/profile_mnist.py
	$(PY) benchmarks/bench_kitti.py
	$(PY) benchmarks/bench_probe.py
	-$(PY) benchmarks/fuzz.py  # failures are listed in the report; it is written anyway
	$(PY) benchmarks/report.py

# On a machine with a GPU: Caffe's golden trajectories trained on CUDA (cuDNN, torch's own kernels, Caffe's
# engine) against Caffe's losses; the MNIST step against the hand-written module, GPU-busy share, GEMM peak; the
# data path; ONNX Runtime's CUDA provider; one-process NCCL -> benchmarks/results/gpu.json, then BENCHMARKS.md.
# GPU_CHECK_FLAGS="--golden DIR --mnist DIR --timing DIR" where ../shared is not beside the checkout.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --device cuda $(GPU_CHECK_FLAGS)
	$(PY) benchmarks/report.py

# Here, before a GPU is lent: what the device machine lacks, in .devdata/ (ignored, ~50 MB; name it in the
# device run's `carry`): BVLC Caffe's golden cases, MNIST and the timing net from $(SHARED) (../shared does not
# travel) and wheels of lmdb and protobuf for the device's Python 3.12. There, one command does the check:
# `bash benchmarks/gpu_device.sh` (results under $$OUT).
SHARED ?= ../shared
WHEEL_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(n)_x86_64)
gpu-carry: $(STAMP)
	rm -rf .devdata && mkdir -p .devdata/timing .devdata/wheels
	cp -r $(SHARED)/reference/golden .devdata/golden
	cp -r $(SHARED)/data/mnist .devdata/mnist
	cp $(SHARED)/reference/timing/thesis_mnist_egomotion_b125.prototxt .devdata/timing/
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .devdata/wheels "lmdb==$$($(PY) -c 'import lmdb; print(lmdb.__version__)')" \
		"protobuf==$$($(PY) -c 'import google.protobuf as p; print(p.__version__)')"
	du -sh .devdata

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
