"""Folders of camera frames on disk: which files count as images, and reading one as RGB.

Shared by the bag writer, the synthetic camera, the INT8 calibrator and the training data loader, so
they all accept the same files. Light on purpose (OpenCV and NumPy only).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` in name order; empty when there are none or the folder is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (alpha dropped), with an error that names the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image '{path}'")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
