# Every target installs first when needed, so a fresh clone needs nothing but `make test` or `make train`.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PROTOC  := $(PY) -m grpc_tools.protoc

.PHONY: install test lint proto train eval bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

proto: $(STAMP)
	$(PROTOC) -I converter --python_out=converter converter/caffe.proto
	sed -i 's/^import caffe_pb2/from converter import caffe_pb2/' converter/caffe_pb2.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
