"""The model contract in torch: what export writes into the ONNX graph and what the torch backend runs.

uint8 NHWC RGB in; the network sees float NCHW in [0, 1]; out come uint8 class ids and uint8 confidence (the
winning class's softmax probability x 255). The Cast comes before the Transpose so that no uint8 tensor
exists inside the graph (TensorRT's ONNX parser refuses uint8 intermediate tensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_perception.class_table import ClassTable, load_class_table
from unet_perception.networks import build_model


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> float [N, 3, H, W] in [0, 1]; cast first, then transpose."""
    return batch.float().permute(0, 3, 1, 2).div(255.0)


class ContractWrapper(nn.Module):
    """uint8 NHWC RGB -> model -> (uint8 class ids NHW, uint8 confidence NHW): the contract, in-graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(to_model_input(image)).float()
        labels = logits.argmax(1)
        # max softmax = 1 / sum(exp(logits - max)): one exp pass, no division per class
        top = logits.max(1, keepdim=True).values
        confidence = 255.0 / torch.exp(logits - top).sum(1)
        # int64 -> float -> uint8: TensorRT converts to uint8 only from float or half
        return labels.float().to(torch.uint8), torch.round(confidence).to(torch.uint8)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a training checkpoint (eval mode) and return it with the checkpoint dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def checkpoint_table(ckpt: dict[str, Any]) -> ClassTable:
    """The class table a checkpoint was trained with (its dataset layout too, when known)."""
    layout = ckpt.get("layout")
    if layout is None:  # checkpoints written before the layout was stored: take the shipped table's
        try:
            layout = load_class_table(ckpt["args"]["dataset"]).layout
        except ValueError:
            layout = {}
    return ClassTable.from_dict({"name": ckpt["dataset"], "classes": ckpt["class_table"],
                                 "ignore_index": ckpt.get("ignore_index"), "layout": layout})
