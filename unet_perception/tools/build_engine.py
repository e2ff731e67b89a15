"""Build (or find) the TensorRT engine for a model ahead of time: for container images, CI and a first check.

    unet-build-engine models/unet_camvid.onnx --precision fp16 --max-batch 4 \\
        --cache-dir ~/.cache/unet_perception/engines

Engines are built strongly typed from the model's per-precision ONNX file (fp32: the model; fp16: its float16
conversion; int8: the symmetric Q/DQ model, e.g. models/unet_camvid_int8.onnx) and cached under a key of ONNX
hash, GPU, TensorRT version, precision and batch profile; the node finds them there with the same options.
Without --build-only, one test inference at max_batch follows and prints the device and output shapes.
Prints the engine path last; exit status 1 with the reason when it cannot build.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from unet_perception.backends.base import BackendError
from unet_perception.backends.engine_cache import default_cache_dir
from unet_perception.backends.factory import PRECISIONS, BackendOptions
from unet_perception.model_contract import ModelError, read_model_info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-build-engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX model following the contract (from unet-export)")
    p.add_argument("--precision", choices=PRECISIONS, default=BackendOptions.precision,
                   help="fp32 (the model as is), fp16 (converted) or int8 (the model's Q/DQ twin); default %(default)s")
    p.add_argument("--max-batch", type=int, default=BackendOptions.max_batch,
                   help="largest batch the engine accepts (the node's max_batch); default %(default)s")
    p.add_argument("--cache-dir", default="", help=f"engine cache folder (default: {default_cache_dir()})")
    p.add_argument("--workspace-mb", type=int, default=BackendOptions.workspace_mb,
                   help="builder workspace limit in MiB; default %(default)s")
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--build-only", action="store_true", help="skip the test inference")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = BackendOptions(max_batch=args.max_batch, device="cuda", precision=args.precision,
                             engine_cache_dir=args.cache_dir, workspace_mb=args.workspace_mb, gpu_id=args.gpu_id)
    try:
        info = read_model_info(args.model)  # a broken model is the user's to fix, with or without TensorRT here
        from unet_perception.backends.tensorrt import TensorRTBackend
        from unet_perception.backends.tensorrt_builder import build_engine

        path = build_engine(args.model, options, print)
        if not args.build_only:
            with TensorRTBackend(info, options, log=print) as backend:
                h, w = info.input_hw
                pred = backend.infer(np.zeros((options.max_batch, h, w, 3), np.uint8))
            confidence = "none" if pred.confidence is None else str(list(pred.confidence.shape))
            print(f"test inference on {backend.device}: batch {options.max_batch} -> labels "
                  f"{list(pred.labels.shape)}, confidence {confidence}")
    except (BackendError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
