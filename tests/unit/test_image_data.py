"""Image datasets in process: class folders of PNG/JPEG and Hugging Face-style Parquet prepared in the
encoded layout, read back pixel for pixel, streamed batches decoded, every bad file named, and a Parquet
dataset trained."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from image_files import CLASSES, class_image, write_hf_parquet, write_image_folder
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.data import decode_columns, load_split, read_file, validate_dataset
from pipeline.data.image_sources import prepare_images, prepare_parquet
from pipeline.errors import DataError
from pipeline.training.inprocess import fit_in_process


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "shapes", per_class=40)


def test_class_folders_become_an_encoded_dataset_read_back_exactly(folder, tmp_path):
    info = prepare_images(folder, tmp_path / "ds", seed=1)
    assert info.encoded and info.shape == (1, 16, 16) and info.class_names == CLASSES
    assert sum(info.num_rows(s) for s in ("train", "val", "test")) == 3 * 40
    validate_dataset(tmp_path / "ds")
    # The PNG/JPEG bytes are stored as they came: nothing re-encoded, so the dataset stays small.
    stored = {
        bytes(b)
        for entry in info.splits["train"]
        for b in pq.read_table(tmp_path / "ds" / entry["name"])["image"].to_pylist()
    }
    originals = {f.read_bytes() for f in folder.rglob("*.*")}
    assert stored <= originals
    x, _ = load_split(tmp_path / "ds", "train")
    assert x.dtype.is_floating_point and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # PNG is lossless: every PNG's pixels come back exactly.
    by_bytes = {f.read_bytes(): f for f in folder.rglob("*.png")}
    raw = pq.read_table(tmp_path / "ds" / info.splits["train"][0]["name"])
    for i, data in enumerate(raw["image"].to_pylist()[:20]):
        if data in by_bytes:
            expected = np.asarray(Image.open(by_bytes[data]))
            assert np.array_equal((x[i, 0] * 255).round().byte().numpy(), expected)


def test_streamed_batches_decode_like_the_reader(folder, tmp_path):
    info = prepare_images(folder, tmp_path / "ds")
    table = pq.read_table(tmp_path / "ds" / info.splits["train"][0]["name"])
    batch = {"image": np.array(table["image"].to_pylist(), dtype=object), "label": table["label"].to_numpy()}
    decoded = decode_columns(batch, shape=info.shape, num_classes=info.num_classes, encoded=True)
    images, labels = read_file(info, info.splits["train"][0])
    assert decoded["image"].dtype == np.uint8 and np.array_equal(decoded["image"], images)
    assert np.array_equal(decoded["label"], labels)
    bad = {"image": batch["image"][:2], "label": np.array([0, 7])}
    with pytest.raises(DataError, match=r"label outside \[0, 3\)"):
        decode_columns(bad, shape=info.shape, num_classes=3, encoded=True)


def test_size_resizes_and_center_crops_and_any_rgb_image_makes_it_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            image = class_image(label, rng, size=20 + i, rgb=(label == 2 and i == 0))
            image.save(tmp_path / "src" / name / f"{i}.{'webp' if i == 1 else 'png'}")  # WebP read too
    with pytest.raises(DataError, match=r"images differ in size: pass --size H W"):
        prepare_images(tmp_path / "src", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    info = prepare_images(tmp_path / "src", tmp_path / "ds", size=(12, 8))
    assert info.shape == (3, 12, 8)
    x, _ = load_split(tmp_path / "ds", "test")
    assert x.shape[1:] == (3, 12, 8)


def broken_copy(folder, tmp_path, change):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    return change(copy)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda d: (
                (d / "circle" / "0001.jpg").write_bytes((d / "circle" / "0001.jpg").read_bytes()[:300])
                and d / "circle" / "0001.jpg"
            ),
            "corrupt or truncated image",
        ),
        (lambda d: (d / "square" / "0002.png").write_bytes(b"") or d / "square" / "0002.png", r"empty \(0 bytes\)"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "empty class folder"),
        (
            lambda d: (d / "triangle" / "notes.txt").write_text("hi") and d / "triangle" / "notes.txt",
            "not an image file",
        ),
        (
            lambda d: (
                (d / "circle" / "0003.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 20) and d / "circle" / "0003.jpg"
            ),
            "not a readable PNG/JPEG/WEBP image|corrupt",
        ),
    ],
    ids=["truncated-jpeg", "zero-byte", "empty-class", "not-an-image", "garbage-jpeg"],
)
def test_each_bad_file_is_refused_by_name_and_nothing_is_written(folder, tmp_path, change, match):
    bad = broken_copy(folder, tmp_path, change)
    with pytest.raises(DataError, match=match) as info:
        prepare_images(tmp_path / "broken", tmp_path / "out")
    assert str(bad) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_hugging_face_parquet_is_prepared_with_its_class_names_and_trains(tmp_path):
    source = write_hf_parquet(tmp_path / "hf", per_class=60)
    info = prepare_parquet(source, tmp_path / "ds", image_column="img", label_column="label")
    assert info.encoded and info.class_names == CLASSES and info.shape == (1, 16, 16)
    assert info.num_rows("test") == 3 * 15  # the test file is the test split; val is carved from train
    config = config_from_dict(
        {
            "data": {"path": str(tmp_path / "ds"), "batch_size": 32},
            "run": {"epochs": 4, "seed": 0},
            "model": {"name": "small_cnn"},
            "method": {"name": "standard"},
            "attack": {"eps": 0.05, "num_steps": 2},
            "validation": {"num_steps": 2, "num_examples": 0},
            "optim": {"name": "adam", "lr": 0.003, "lr_schedule": "constant"},
        }
    )
    _model, _arch, reporter = fit_in_process(config)
    last = reporter.metrics[max(reporter.metrics)]
    assert last["val/clean_acc"] > 0.6, last
    with pytest.raises(DataError, match=r"cannot read columns 'image' and 'label'.*--image-column"):
        prepare_parquet(source, tmp_path / "refused")
