"""Dataset loaders on the real layouts (CamVid pair lists, the lab's CARLA folders) and augmentation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA

from unet_perception.class_table import load_class_table
from unet_perception.training.data import (
    SegmentationDataset,
    block_split,
    class_uniform_crop,
    list_pairs,
    random_crop,
    read_label,
    resize_transform,
    train_transform,
)

CAMVID, CARLA = DATA / "camvid", DATA / "carla"
needs_camvid = pytest.mark.skipif(not (CAMVID / "train.txt").is_file(),
                                  reason=f"CamVid is not at {CAMVID} (see ../shared/data/README.md)")
needs_carla = pytest.mark.skipif(not (CARLA / "CameraRGB").is_dir(),
                                 reason=f"the CARLA lab frames are not at {CARLA}")


@needs_camvid
def test_camvid_pair_lists_give_the_segnet_split() -> None:
    table = load_class_table("camvid")
    train, val = list_pairs(CAMVID, table, "train"), list_pairs(CAMVID, table, "val")
    assert (len(train), len(val)) == (367, 101)
    assert all(p.image.is_file() and p.label.is_file() and p.image.name == p.label.name for p in train + val)
    assert {p.image.parent.name for p in train} == {"train"} and {p.label.parent.name for p in val} == {"valannot"}
    assert all(p.image.name.startswith("0016E5") for p in val)  # val is one sequence


@needs_camvid
def test_camvid_frames_are_rgb_with_class_ids_and_void() -> None:
    table = load_class_table("camvid")
    ds = SegmentationDataset(CAMVID, table, "val", limit=3)
    assert len(ds) == 3
    img, lab = ds[0]
    assert img.shape == (360, 480, 3) and img.dtype == np.uint8
    assert lab.shape == (360, 480) and lab.dtype == np.uint8
    assert lab.max() <= table.ignore_index == 11
    # RGB order: the sky (class 0) is brighter in blue than in red on these daytime frames.
    sky = img[lab == 0]
    assert sky.size and sky[:, 2].mean() >= sky[:, 0].mean()
    fractions = ds.class_pixel_fractions()
    assert fractions.shape == (11,) and fractions.sum() == pytest.approx(1.0)


@needs_camvid
def test_camvid_split_without_its_list_file_says_which_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"split file '.*test\.txt' not found"):
        list_pairs(CAMVID, load_class_table("camvid"), "test")


@needs_carla
def test_carla_folders_read_channel_0_ids_at_640x480() -> None:
    table = load_class_table("carla")
    ds = SegmentationDataset(CARLA, table, "all")
    assert len(ds) == 14 and table.num_classes == 23
    for (img, lab), pair in zip((ds[i] for i in range(len(ds))), ds.pairs, strict=True):
        assert img.shape == (480, 640, 3) and lab.shape == (480, 640)
        assert lab.max() < 23
        raw = cv2.imread(str(pair.label), cv2.IMREAD_UNCHANGED)  # BGRA: red (channel 0) is index 2
        np.testing.assert_array_equal(lab, raw[:, :, 2])
    # Road and sky dominate the lab's frames.
    fractions = ds.class_pixel_fractions()
    assert fractions[7] > 0.3 and fractions[13] > 0.2


@needs_carla
def test_carla_split_is_by_blocks_of_names() -> None:
    table = load_class_table("carla")
    every, train, val = ([p.image.name for p in list_pairs(CARLA, table, split)]
                         for split in ("all", "train", "val"))
    assert sorted(train + val) == every and not set(train) & set(val)
    assert 0 < len(val) < len(train)
    block = table.layout["split_block"]
    blocks = [set(every[i:i + block]) for i in range(0, len(every), block)]
    # A block is all train or all val: no val frame has its near-duplicate neighbour of the block in train.
    assert all(b <= set(val) or not b & set(val) for b in blocks)


def test_block_split_sends_every_kth_block_to_val() -> None:
    names = [f"{i:03d}" for i in range(40)]
    val = block_split(names, val_fraction=0.25, block=5)
    assert val == names[15:20] + names[35:40]
    with pytest.raises(ValueError, match="val_fraction must be in"):
        block_split(names, 1.5, 5)


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset root '.*nowhere' does not exist"):
        list_pairs(tmp_path / "nowhere", load_class_table("camvid"), "train")


def test_empty_image_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "CameraRGB").mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG frames in '.*CameraRGB'"):
        list_pairs(tmp_path, load_class_table("carla"), "train")


@needs_camvid
@needs_carla
@pytest.mark.parametrize("dataset, root", [("camvid", CAMVID), ("carla", CARLA)])
def test_unknown_split_lists_the_valid_ones(dataset: str, root: Path) -> None:
    with pytest.raises(ValueError, match="not 'tset'"):
        list_pairs(root, load_class_table(dataset), "tset")


def test_multichannel_mask_needs_a_channel(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="must name mask_channel"):
        read_label(path)


def _encoded_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 16x16 blocks of classes 0/1; the image is bright where the label is 1, dark where 0."""
    rng = np.random.default_rng(seed)
    lab = np.kron(rng.integers(0, 2, (4, 6)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
    img = np.where(lab[..., None] == 1, 230, 40).astype(np.uint8).repeat(3, axis=2)
    return img, lab


def test_augmentation_keeps_image_and_label_aligned() -> None:
    ignore = 11
    aug = train_transform((64, 96), scale=(0.6, 1.5), ignore_index=ignore, seed=3)
    misaligned_scores = []
    for seed in range(12):
        img, lab = aug(*_encoded_pair(seed))
        assert img.shape == (64, 96, 3) and lab.shape == (64, 96) and img.dtype == lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, ignore}  # nearest for labels: no blended ids
        valid = lab != ignore
        gray = img.mean(axis=2)
        # Colour jitter moves both levels: split them halfway between the two classes' medians.
        bright = gray > (np.median(gray[lab == 0]) + np.median(gray[lab == 1])) / 2
        # Bilinear image edges against nearest label edges: a few border pixels may differ.
        assert (bright == (lab == 1))[valid].mean() > 0.95
        flipped = lab[:, ::-1]
        both = valid & (flipped != ignore)
        misaligned_scores.append((bright == (flipped == 1))[both].mean())
    assert min(misaligned_scores) < 0.8  # the check does notice a label that is off


def test_resize_transform_is_bilinear_for_images_and_nearest_for_labels() -> None:
    img, lab = _encoded_pair(0)
    small_img, small_lab = resize_transform((32, 48))(img, lab * 5)
    assert small_img.shape == (32, 48, 3) and small_lab.shape == (32, 48)
    assert set(np.unique(small_lab)) <= {0, 5}


def _augmented_batches(workers: int, seed: int) -> list[np.ndarray]:
    import torch
    from torch.utils.data import DataLoader

    img, lab = _encoded_pair(0)
    aug = train_transform((64, 96), scale=(0.6, 1.5), ignore_index=11, seed=3)
    dataset = [(img, lab)] * 4  # the same frame four times: any difference comes from augmentation

    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int) -> np.ndarray:
            return aug(*dataset[i])[0]

    loader = DataLoader(Augmented(), batch_size=1, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    return [b[0].numpy() for b in loader]


def test_each_loader_worker_draws_its_own_augmentations() -> None:
    out = _augmented_batches(workers=2, seed=0)
    # Samples 0 and 1 are the first ones of worker 0 and worker 1: equal if the workers shared the state.
    assert not np.array_equal(out[0], out[1])
    again = _augmented_batches(workers=2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(out, again, strict=True))  # still deterministic


def _corner_patch_label() -> np.ndarray:
    """100x100 of class 0 with a 4x4 patch of class 1 in the top-left corner (1.6% of the pixels)."""
    lab = np.zeros((100, 100), np.uint8)
    lab[:4, :4] = 1
    return lab


# A 20x20 crop holds the patch when its top and left are both <= 3. Random crops: top and left uniform in 0..80,
# (4/81)^2 = 0.0024. Class-uniform crops: class 1 half the time (always holds it); class 0 the other half, and
# a class-0 centre at y, x <= 13 (14 * 14 - 16 = 180 of its 9984 pixels) clamps the crop onto the patch:
# 0.5 + 0.5 * 180 / 9984 = 0.509.
RANDOM_HITS, UNIFORM_HITS = (4 / 81) ** 2, 0.5 + 0.5 * 180 / 9984


def test_class_uniform_crops_favour_the_rare_class() -> None:
    lab = _corner_patch_label()
    img = np.zeros((100, 100, 3), np.uint8)
    rng = np.random.default_rng(0)
    n = 4000
    uniform = [class_uniform_crop(img, lab, (20, 20), rng, ignore_index=11) for _ in range(n)]
    assert all(c[0].shape == (20, 20, 3) and c[1].shape == (20, 20) for c in uniform)
    hits = np.mean([(c[1] == 1).any() for c in uniform])
    assert abs(hits - UNIFORM_HITS) < 0.04  # 5 standard errors
    plain = np.mean([(random_crop(img, lab, (20, 20), rng)[1] == 1).any() for _ in range(n)])
    assert plain < 0.01


def test_rare_crop_probability_reaches_the_training_transform() -> None:
    lab = _corner_patch_label()
    img = np.zeros((100, 100, 3), np.uint8)
    n = 2000
    for p, expected in ((0.0, RANDOM_HITS), (0.5, 0.5 * UNIFORM_HITS + 0.5 * RANDOM_HITS)):
        aug = train_transform((20, 20), scale=(1.0, 1.0), ignore_index=11, seed=1, rare_crop=p)
        hits = np.mean([(aug(img, lab)[1] == 1).any() for _ in range(n)])
        assert abs(hits - expected) < 0.05, (p, hits)
    with pytest.raises(ValueError, match="rare_crop"):
        train_transform((20, 20), (1.0, 1.0), 11, rare_crop=1.5)
