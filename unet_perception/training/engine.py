"""Training and validation steps shared by ``train`` and ``evaluate``: one place for the tensor
conventions (uint8 NHWC RGB in, [0, 1] float NCHW to the model, labels at the frame's own size)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from unet_perception.torch_contract import to_model_input
from unet_perception.metrics import confusion_matrix
from unet_perception.pipeline import preprocess, upscale_labels


def collate(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.from_numpy(np.stack([s[1] for s in samples]))
    return images, labels


def train_one_epoch(model: nn.Module, loader: Iterable, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None, progress: Callable | None = None,
                    after_step: Callable[[], None] | None = None) -> dict:
    """One pass over ``loader``; returns mean loss and images/s. ``progress(loss, ips)`` is called per step,
    ``after_step()`` after each optimizer step (the EMA of the weights)."""
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    use_amp = scaler is not None and device.type == "cuda"
    for images, labels in loader:
        x = to_model_input(images.to(device, non_blocking=True))
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}; lower --lr or check the labels")
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            assert scaler is not None
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(images)
        count += len(images)
        ips = count / (time.perf_counter() - start)
        if progress is not None:
            progress(loss.item(), ips)
    return {"loss": total / max(1, count), "images_per_s": count / (time.perf_counter() - start)}


@torch.inference_mode()
def predict_labels(model: nn.Module, frames: list[np.ndarray], input_hw: tuple[int, int],
                   device: torch.device, batch_size: int = 8) -> list[np.ndarray]:
    """Labels for RGB frames of any size: resize to the model input (bilinear), argmax, then nearest
    upscale back to each frame's own size, exactly as the runtime pipeline does."""
    model.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(frames), batch_size):
        chunk = frames[i:i + batch_size]
        batch = preprocess(chunk, input_hw)  # the runtime's own resize, so val scores are the node's
        logits = model(to_model_input(torch.from_numpy(batch).to(device)))
        small = logits.argmax(1).to(torch.uint8).cpu().numpy()
        out.extend(upscale_labels(lab, f.shape[:2]) for f, lab in zip(chunk, small))
    return out


def confusion_on_frames(predict: Callable[[list[np.ndarray]], list[np.ndarray]], images: list[np.ndarray],
                        labels: list[np.ndarray], num_classes: int, ignore_index: int | None,
                        batch_size: int = 8) -> np.ndarray:
    """Confusion matrix of ``predict`` (frames -> label maps) over frames at their own resolution."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(0, len(images), batch_size):
        preds = predict(images[i:i + batch_size])
        for truth, pred in zip(labels[i:i + batch_size], preds):
            cm += confusion_matrix(truth, pred, num_classes, ignore_index)
    return cm


def all_reduce_confusion(cm: np.ndarray) -> np.ndarray:
    """Sum a confusion matrix over DDP ranks (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        t = torch.from_numpy(cm.astype(np.int64))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().numpy()
    return cm
