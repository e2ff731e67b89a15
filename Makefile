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

.PHONY: venv vision_msgs demo test model folds folds-compare clean

$(STAMP): requirements/*.txt setup.py package.xml interfaces/vision_msgs/msg/*.msg
	@if [ "$$ROS_DISTRO" = "jazzy" ]; then \
	  echo "ROS 2 Jazzy is sourced: venv with system site packages"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if [ "$$ROS_DISTRO" != "jazzy" ]; then $(PY) -m pip install -q -r requirements/ros-wheels.txt; fi
	$(PY) -m pip install -q -r requirements/runtime.txt -r requirements/train.txt -r requirements/dev.txt \
		-r requirements/fleet.txt
	$(PY) -m pip install -q --no-deps tensorrt-stubs
	$(PY) -m pip install -q --no-deps -e .
	@if [ "$$ROS_DISTRO" != "jazzy" ]; then $(MAKE) --no-print-directory vision_msgs; fi
	touch $(STAMP)

venv: $(STAMP)

# vision_msgs (LabelInfo) has no PyPI wheel: build our two-message stand-in, interfaces/vision_msgs, with the
# rosidl generator wheels (requirements/ros-wheels.txt) and install it into the venv, next to the other ROS
# wheels. On a ROS 2 system the package.xml dependency brings the official ros-jazzy-vision-msgs instead.
VM_BUILD ?= build/vision_msgs
VM_PREFIX ?= $(abspath $(VENV))
vision_msgs:
	@V=$(abspath $(VENV)); export PATH=$$V/bin:$$PATH AMENT_PREFIX_PATH=$$V CMAKE_PREFIX_PATH=$$V LD_LIBRARY_PATH=$$V/lib; \
	mkdir -p $(VM_BUILD) && \
	{ cmake -S interfaces/vision_msgs -B $(VM_BUILD) -DCMAKE_INSTALL_PREFIX=$(VM_PREFIX) \
	    -DPython3_EXECUTABLE=$$V/bin/python -DBUILD_TESTING=OFF \
	  && cmake --build $(VM_BUILD) -j 2 && cmake --install $(VM_BUILD); } > $(VM_BUILD).log 2>&1 \
	  || { tail -30 $(VM_BUILD).log; echo "building interfaces/vision_msgs failed (log: $(VM_BUILD).log)"; exit 1; }
	@echo "vision_msgs (LabelInfo, VisionClass) built and installed into $(VM_PREFIX)"

# Road frames -> rosbag2 -> the node (as seg.launch.py starts it) -> recorded bag, overlay PNGs and a summary
# in out/demo. DEMO_ARGS passes more options, e.g. DEMO_ARGS="--model path/to/model.onnx --frames 30".
demo: $(STAMP)
	$(VENV)/bin/unet-demo --images $(IMAGES) --out out/demo $(DEMO_ARGS)

# The venv's bin/ goes first on PATH so the tests find its colcon and console scripts.
test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q test

# Reproduce the shipped models from scratch: the standard final fit of recipe $(RECIPE) (unet_perception/training/
# options.py) on CamVid train+val (468 frames) with its fixed schedule, nothing selected (last.pt is the model), then
# export fp32, quantize int8 and evaluate both. Val is inside the fit, so its scores here are a sanity check on seen
# frames, not an estimate: `make folds` gives that. About 1.3x the 83 min of the train-only run on the 2-core CPU
# (an estimate; models/README.md); on a GPU machine unet-train uses CUDA and AMP by itself.
# TRAIN_ARGS override the recipe, e.g. `make model TRAIN_ARGS="--workers 1 --arch seed"`. RUN_DIR (checkpoints,
# reports) and MODEL_DIR (the two shipped files, overwritten) can point elsewhere, e.g. a toy run that leaves
# models/ alone: `make model TRAIN_ARGS="--epochs 1 --limit 8 --workers 0" RUN_DIR=/tmp/run MODEL_DIR=/tmp/run`
# (under a minute; such a model's int8 twin usually fails unet-quantize's 97% label agreement with fp32, and make
# stops there with the file set aside as .rejected).
RECIPE ?= today
RUN_DIR ?= runs/camvid
MODEL_DIR ?= models
TRAIN_ARGS ?= --workers 1
# Trained at 288x384, shipped at 256x352 for 0.5 points of val mIoU: raw inference 4.8x the seed's speed on the
# 2-core CPU in the side-by-side run of 2026-11-26, at least 4.4x in every quiet run, against 3.7x at 288x384 (docs/
# performance.md, models/README.md); the second export embeds the val report of the exported file itself.
EXPORT_SIZE ?= 256x352
model: $(STAMP)
	$(VENV)/bin/unet-train --recipe $(RECIPE) --train-splits train,val --dataset camvid --data $(DATA)/camvid \
		--out $(RUN_DIR) $(TRAIN_ARGS)
	$(VENV)/bin/unet-export $(RUN_DIR)/last.pt $(RUN_DIR)/export.onnx --input-size $(EXPORT_SIZE)
	$(VENV)/bin/unet-evaluate $(RUN_DIR)/export.onnx --data $(DATA)/camvid --out $(RUN_DIR)/eval
	mkdir -p $(MODEL_DIR)
	$(VENV)/bin/unet-export $(RUN_DIR)/last.pt $(MODEL_DIR)/unet_camvid.onnx --input-size $(EXPORT_SIZE) \
		--check-data $(DATA)/camvid --metrics $(RUN_DIR)/eval/report.json
	$(VENV)/bin/unet-quantize $(MODEL_DIR)/unet_camvid.onnx $(MODEL_DIR)/unet_camvid_int8.onnx --data $(DATA)/camvid
	$(VENV)/bin/unet-evaluate $(MODEL_DIR)/unet_camvid_int8.onnx --data $(DATA)/camvid --out $(RUN_DIR)/eval_int8

# Cross-validation by sequence for recipe $(RECIPE): hold out 0006R0, then 0001TP, train on the rest of train+val,
# score the last weights on the held-out frames at the export size; runs/folds/$(RECIPE)/folds.md is the per-class
# table with the mean. Two training runs of 367 and 406 frames (the final fit: 468): roughly 1.8-3 h per recipe
# on the 2-core CPU (estimate, models/README.md). `make folds-compare` tabulates every recipe's fold mean.
FOLD_ARGS ?= --workers 1
folds: $(STAMP)
	$(VENV)/bin/unet-folds --recipe $(RECIPE) --data $(DATA)/camvid --out runs/folds --eval-size $(EXPORT_SIZE) \
		$(FOLD_ARGS)

folds-compare: $(STAMP)
	$(VENV)/bin/unet-folds --compare runs/folds

clean:
	rm -rf $(VENV) build install log

# Everything GPU-related this machine can run, under 6 minutes: torch CUDA parity with ONNX Runtime and 640x480
# speed, the CUDA memory helper, AMP training steps, and where TensorRT imports its tests and benchmark rows.
# A table at the end; exit 1 on any failure; SKIP names what the machine lacks. Uses the venv when there is one,
# else $(PYTHON) with the repository on PYTHONPATH (GPU machines with torch, cuda-python and onnxruntime installed).
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
.PHONY: gpu-check
gpu-check:
	PYTHONPATH="$(CURDIR):$$PYTHONPATH" $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The node at 10/20/30/60 Hz and at its own maximum, 1 and 4 cameras of 640x480 frames from a separate publisher
# process, beside raw inference of the same model; table printed, JSON in out/bench.json; < 5 min on an idle 2-core
# machine. BENCH_ARGS adds options, e.g. BENCH_ARGS="--levers" (one row per lever) or "--soak 600" (RSS slope).
bench: $(STAMP)
	mkdir -p out
	$(PY) benchmarks/bench.py --images $(IMAGES) --json out/bench.json $(BENCH_ARGS)
