# Every target installs first when needed, so a fresh clone needs nothing but `make test` or `make train`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PROTOC  := $(PY) -m grpc_tools.protoc

.PHONY: install test lint proto train eval eval-transfer bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# ---------------------------------------------------------------------------------------------------
# The main job: the thesis's MNIST experiment (egomotion vs SFA vs scratch), runner/experiments/mnist.py.
#   make train   pair LMDBs + pre-training of egomotion, SFA m=10 and SFA m=100     -> runs/mnist/$(SCALE)/
#   make eval    fine-tuning on 100/300/1000/10000 labels x 3 seeds, results.md/.csv and plots
# SCALE=demo (default: both targets in about 20 minutes on 2 CPU cores) or SCALE=full (the thesis's numbers).
# JOBS=N trains N nets side by side, each on cpus/N threads (SCALE=full, JOBS=2 on 2 cores: both SFA nets at
# 7.2-8.1 it/s each). An interrupted run resumes from its newest snapshot when the target is run again.
# MNIST comes from MNIST_DIR (default: ../shared/data/mnist when present), else the cache or a download.
# ---------------------------------------------------------------------------------------------------
SCALE     ?= demo
JOBS      ?= 1
MNIST_DIR ?= $(wildcard $(abspath ../shared/data/mnist))
export MNIST_DIR

train: $(STAMP)
	$(PY) -m runner.experiments.mnist train --scale $(SCALE) --jobs $(JOBS)

eval: $(STAMP)
	$(PY) -m runner.experiments.mnist eval --scale $(SCALE) --jobs $(JOBS)

# SUN-397 layer probes and ImageNet fine-tuning of pre-trained snapshots (runner/experiments/transfer.py):
#   SUN_DIR=… IMAGENET_DIR=… PRETRAINED=KITTI-EGO=a.caffemodel,KITTI-SFA=b.caffemodel make eval-transfer
eval-transfer: $(STAMP)
	$(PY) -m runner.experiments.transfer all --sun-dir "$(SUN_DIR)" --imagenet-dir "$(IMAGENET_DIR)" \
	    --pretrained "$(PRETRAINED)"

lint: $(STAMP)
	$(PY) -m ruff check .

proto: $(STAMP)
	$(PROTOC) -I converter --python_out=converter converter/caffe.proto
	sed -i 's/^import caffe_pb2/from converter import caffe_pb2/' converter/caffe_pb2.py

# All measurements, each writing benchmarks/results/<name>.{md,json} and printing one JSON line: the GEMM
# peak of the machine; converted CaffeNet vs hand-written PyTorch on the timing nets and AlexNet build time;
# the MNIST pair generator and egomotion training speed, and the profile of one iteration; the KITTI pair
# generator; ONNX Runtime feature extraction; 10,000 fuzz cases per reader. Last, benchmarks/report.py
# collects them into BENCHMARKS.md. BENCH_FLAGS=--quick: fewer KITTI-net iterations.
bench: $(STAMP)
	$(PY) benchmarks/gemm_peak.py
	$(PY) benchmarks/bench_converter.py $(BENCH_FLAGS)
	$(PY) benchmarks/bench_mnist.py
	$(PY) benchmarks/profile_mnist.py
	$(PY) benchmarks/bench_kitti.py
	$(PY) benchmarks/bench_probe.py
	-$(PY) benchmarks/fuzz.py  # failures are listed in the report; it is written anyway
	$(PY) benchmarks/report.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------------------------------
# KITTI egomotion (KITTI-AUT) and SFA (KITTI-SFA) pre-training of the AlexNet siamese net (notes §1.4.3-6).
#   KITTI_DIR=/path/to/dataset make kitti SCALE=full                 the thesis's data (image_2, 00-08 / 09-10,
#       2,300 pairs per sequence) and schedule (60,000 / 40,000 iterations)
#   KITTI_DIR=../shared/data/kitti_odometry_00 make kitti SCALE=demo the 151-frame sample, minutes on CPU
#       (SCALE defaults to demo, as for make train)
# Data go to data/kitti/$(SCALE)/, runs to runs/kitti/$(SCALE)/ (the prototxts used, train.log, train.csv,
# curves.png, heads.png, snapshots); the final snapshots are copied to runs/kitti/$(SCALE)/KITTI-{AUT,SFA}.caffemodel.
# The LMDBs are made once (delete data/kitti/$(SCALE) to remake them).
# GPU=0 (or 0,1 / all) trains on GPUs; KITTI_FLAGS adds kitti-pairs flags (e.g. "--translation-frame world"
# for the thesis's exact labels, "--labels agrawal2015" for the paper's 22 classes, the heads follow).
# ---------------------------------------------------------------------------------------------------
.PHONY: kitti
KITTI_RUN  := runs/kitti/$(SCALE)
KITTI_DATA := data/kitti/$(SCALE)
KITTI_CLI  := $(PY) -m runner.cli
KITTI_PAIRS_full   := --camera image_2 --train 00-08 --val 09-10 --pairs-per-sequence 2300
KITTI_PAIRS_demo   := --camera image_0 --mode color --train 00:0-119 --val 00:120-150 --train-pairs 800 --val-pairs 160
# demo: batch 8, a few hundred iterations (max_iter per net), a test every 100 on 80 validation pairs
KITTI_NET_demo     := -e 's/batch_size: [0-9]*/batch_size: 8/'
KITTI_SOLVER_demo  := -e 's/^test_iter: .*/test_iter: 10/' -e 's/^test_interval: .*/test_interval: 100/' \
                      -e 's/^snapshot: .*/snapshot: 100/' -e 's/^display: .*/display: 10/'
KITTI_ITERS_demo   := egomotion=200 sfa=150

kitti: $(STAMP)
	@if [ -z "$(KITTI_DIR)" ]; then echo "make kitti: KITTI_DIR is not set. KITTI odometry comes from https://www.cvlibs.net/datasets/kitti/eval_odometry.php (data_odometry_color.zip + data_odometry_poses.zip, free registration): unpack both into one folder and run KITTI_DIR=/path/to/dataset make kitti [SCALE=full|demo]; the 151-frame sample: KITTI_DIR=../shared/data/kitti_odometry_00 make kitti SCALE=demo"; exit 2; fi
	@case "$(SCALE)" in demo|full) ;; *) echo "make kitti: SCALE must be demo or full, got '$(SCALE)'"; exit 2;; esac
	@mkdir -p $(KITTI_RUN)/egomotion $(KITTI_RUN)/sfa
	@test -f $(KITTI_DATA)/egomotion/summary.json || $(KITTI_CLI) data kitti-pairs --kitti-dir $(KITTI_DIR) \
	    --out $(KITTI_DATA)/egomotion $(KITTI_PAIRS_$(SCALE)) $(KITTI_FLAGS) --mean --overwrite
	@test -f $(KITTI_DATA)/sfa/summary.json || $(KITTI_CLI) data kitti-pairs --kitti-dir $(KITTI_DIR) \
	    --out $(KITTI_DATA)/sfa --task sfa $(KITTI_PAIRS_$(SCALE)) $(KITTI_FLAGS) --mean --overwrite
	@for t in egomotion sfa; do \
	    n=; for kv in $(KITTI_ITERS_$(SCALE)); do [ "$${kv%%=*}" = $$t ] && n=$${kv#*=}; done; \
	    sed -e 's|data/kitti/|$(KITTI_DATA)/|' $(KITTI_NET_$(SCALE)) \
	        $(if $(findstring agrawal2015,$(KITTI_FLAGS)),-e 's/num_output: 20$$/num_output: 22/') \
	        prototxt/kitti/$${t}_train_val.prototxt \
	        > $(KITTI_RUN)/$$t/train_val.prototxt; \
	    sed -e 's|^net: .*|net: "$(KITTI_RUN)/'$$t'/train_val.prototxt"|' -e 's|^snapshot_prefix: "runs/kitti/|snapshot_prefix: "$(KITTI_RUN)/|' \
	        $(KITTI_SOLVER_$(SCALE)) prototxt/kitti/$${t}_solver.prototxt > $(KITTI_RUN)/$$t/solver.prototxt; \
	    if [ -n "$$n" ]; then sed -i "s/^max_iter: .*/max_iter: $$n/" $(KITTI_RUN)/$$t/solver.prototxt; fi; \
	done
	$(KITTI_CLI) train --solver $(KITTI_RUN)/egomotion/solver.prototxt $(if $(GPU),--gpu $(GPU))
	$(KITTI_CLI) train --solver $(KITTI_RUN)/sfa/solver.prototxt $(if $(GPU),--gpu $(GPU))
	@for t in egomotion sfa; do $(KITTI_CLI) plot $(KITTI_RUN)/$$t/train.log -o $(KITTI_RUN)/$$t/curves.png \
	    --title "KITTI $$t ($(SCALE))"; done
	$(PY) -m runner.kitti_cli plot-heads $(KITTI_RUN)/egomotion/train.csv -o $(KITTI_RUN)/egomotion/heads.png \
	    --title "KITTI egomotion ($(SCALE)): each head" --classes $(if $(findstring agrawal2015,$(KITTI_FLAGS)),22,20)
	cp "$$(ls -v $(KITTI_RUN)/egomotion/kitti_aut_iter_*.caffemodel | tail -1)" $(KITTI_RUN)/KITTI-AUT.caffemodel
	cp "$$(ls -v $(KITTI_RUN)/sfa/kitti_sfa_iter_*.caffemodel | tail -1)" $(KITTI_RUN)/KITTI-SFA.caffemodel
	@echo "KITTI-AUT and KITTI-SFA: $(KITTI_RUN)/KITTI-{AUT,SFA}.caffemodel; curves: $(KITTI_RUN)/{egomotion,sfa}/curves.png, $(KITTI_RUN)/egomotion/heads.png"
