"""The shipped models side by side: parameters, GFLOP, raw inference and the node end to end, val mIoU.

    python benchmarks/models.py [--data ../shared/data/camvid] [--rounds 30] [--node-rounds 30]

Compares, in one run on one machine, at 640x480 camera frames and one camera:
- seed: the lab's U-Net as first shipped (``git show a77a224:models/unet_camvid.onnx``, 240x320 input);
- fp32: ``models/unet_camvid.onnx`` (U-Net on EfficientNet-Lite0, the default);
- int8: ``models/unet_camvid_int8.onnx`` (its symmetric int8 Q/DQ twin).
GFLOP counts the multiply-adds of every Conv and ConvTranspose x 2 at batch 1 (what dominates these nets).
"Raw" is ``backend.infer`` on an already resized batch of 1; "node" is the segmentation node on a real rclpy
graph publishing labels, colour and overlay (benchmarks/node_latency.py), one frame in flight at a time.
val mIoU is scored as ``unet-evaluate`` scores an ONNX file (the node's own pre/post-processing).
Prints a Markdown table; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_latency  # noqa: E402  (benchmarks/node_latency.py)
import pipeline as stages  # noqa: E402  (benchmarks/pipeline.py)

REPO = Path(__file__).resolve().parents[1]
SEED_COMMIT = "a77a224"  # the commit that first shipped models/unet_camvid.onnx (seed U-Net)


def seed_from_history(folder: Path) -> Path:
    """The seed model as first shipped, read from git history (it is no longer in the tree)."""
    out = folder / "seed_unet_camvid.onnx"
    blob = subprocess.run(["git", "-C", str(REPO), "show", f"{SEED_COMMIT}:models/unet_camvid.onnx"],
                          capture_output=True, check=True).stdout
    out.write_bytes(blob)
    return out


def conv_gflop(path: Path) -> float:
    """2 x multiply-adds of every Conv / ConvTranspose at batch 1, from ONNX shape inference."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for tensor in (*model.graph.input, *model.graph.output):
        dim = tensor.type.tensor_type.shape.dim
        if dim and not dim[0].HasField("dim_value"):
            dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    macs = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = node.input[1]
        while w not in weights and w in producers:  # int8 models: weight <- DequantizeLinear <- initializer
            w = producers[w].input[0]
        kshape = weights[w]
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            macs += int(np.prod(out)) * kshape[1] * int(np.prod(kshape[2:]))
        else:  # ConvTranspose: every input pixel scatters a kernel into every output channel
            inp = shapes[node.input[0]]
            macs += int(np.prod(inp)) * kshape[1] * groups * int(np.prod(kshape[2:]))
    return 2 * macs / 1e9


def parameters(path: Path) -> int:
    """Weights and biases of the network (float or int8 tensors; Q/DQ scales and zero points not counted)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = [*model.graph.initializer,
               *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
    return sum(int(np.prod(t.dims)) for t in tensors
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8) and int(np.prod(t.dims)) > 1
               and not t.name.endswith(("_scale", "_zero_point")) and numpy_helper.to_array(t).ndim >= 1)


def val_miou(path: Path, data: Path | None) -> float | None:
    if data is None or not (data / "val.txt").is_file():
        return None
    from unet_perception.training.quantize import val_metrics

    return float(val_metrics(path, data)["mean_iou"])


def measure(name: str, path: Path, data: Path | None, rounds: int, node_rounds: int, threads: int) -> dict[str, Any]:
    frame, _ = stages.camera_frame()
    raw = node_latency.raw_ms_per_frame(path, frame, 1, threads, rounds)
    node, lat_mean, lat_p99 = node_latency.node_ms_per_frame(path, frame, 1, threads, node_rounds)
    return {"model": name, "file": str(path), "params": parameters(path), "gflop": conv_gflop(path),
            "raw_ms": raw, "node_ms": node, "node_fps": 1e3 / node, "latency_mean_ms": lat_mean,
            "latency_p99_ms": lat_p99, "val_miou": val_miou(path, data)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "camvid",
                   help="CamVid root for val mIoU (skipped when absent)")
    p.add_argument("--rounds", type=int, default=30, help="timed raw inference calls per model")
    p.add_argument("--node-rounds", type=int, default=30, help="timed frames through the node per model")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [("seed U-Net (first shipped)", seed_from_history(Path(tmp))),
                  ("lite U-Net fp32 (default)", REPO / "models" / "unet_camvid.onnx"),
                  ("lite U-Net int8", REPO / "models" / "unet_camvid_int8.onnx")]
        for name, path in models:
            print(f"measuring {name} ({path.name})...", file=sys.stderr, flush=True)
            rows.append(measure(name, path, args.data, args.rounds, args.node_rounds, args.threads))
    base = rows[0]["raw_ms"]
    print(f"\n{platform.processor() or platform.machine()}, ONNX Runtime CPU, 640x480 rgb8 camera frames, one camera\n")
    print("| model | params | GFLOP | raw ms/frame | speed-up | node ms/frame | node fps | latency p99 ms | val mIoU |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        miou = "n/a" if r["val_miou"] is None else f"{r['val_miou']:.3f}"
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['gflop']:.1f} | {r['raw_ms']:.1f} | "
              f"{base / r['raw_ms']:.1f}x | {r['node_ms']:.1f} | {r['node_fps']:.1f} | {r['latency_p99_ms']:.0f} | "
              f"{miou} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
