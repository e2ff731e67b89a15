# unet_perception: the README's two commands are `make demo` and `make test`.
# On a machine with a sourced ROS 2 Jazzy (ROS_DISTRO=jazzy) the venv sees the system's rclpy;
# elsewhere it gets the ros-jazzy-* wheels from PyPI.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
IMAGES ?= $(DATA)/camvid/val
STAMP := $(VENV)/.installed

.PHONY: venv demo test model clean

$(STAMP): requirements/*.txt setup.py package.xml
	@if [ "$$ROS_DISTRO" = "jazzy" ]; then \
	  echo "ROS 2 Jazzy is sourced: venv with system site packages"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if [ "$$ROS_DISTRO" != "jazzy" ]; then $(PY) -m pip install -q -r requirements/ros-wheels.txt; fi
	$(PY) -m pip install -q -r requirements/runtime.txt -r requirements/train.txt -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps tensorrt-stubs
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Road frames -> rosbag2 -> the node (as seg.launch.py starts it) -> recorded bag, overlay PNGs and a summary
# in out/demo. DEMO_ARGS passes more options, e.g. DEMO_ARGS="--model path/to/model.onnx --frames 30".
demo: $(STAMP)
	$(VENV)/bin/unet-demo --images $(IMAGES) --out out/demo $(DEMO_ARGS)

# The venv's bin/ goes first on PATH so the tests find its colcon and console scripts.
test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q test

# Reproduce the shipped model from scratch: train, evaluate on val, export with the val report as metadata.
# About 70 min on 2 CPU cores; on a GPU machine it uses CUDA and AMP by itself.
TRAIN_ARGS ?= --input-size 240x320 --crop-size 128x192 --scale 0.5 0.9 --epochs 32 --batch-size 8 \
	--lr 2e-3 --norm batch --workers 1 --val-every 2 --seed 0
model: $(STAMP)
	$(VENV)/bin/unet-train --dataset camvid --data $(DATA)/camvid --out runs/camvid $(TRAIN_ARGS)
	$(VENV)/bin/unet-evaluate runs/camvid/best.pt --data $(DATA)/camvid --out runs/camvid/eval
	$(VENV)/bin/unet-export runs/camvid/best.pt models/unet_camvid.onnx --check-data $(DATA)/camvid \
		--metrics runs/camvid/eval/report.json

clean:
	rm -rf $(VENV) build install log
