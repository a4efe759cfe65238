"""The demo model: IDX parsing, the written image layout, and a short real training run."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.demo import fashion
from services.demo import train as demo_train
from services.demo.evaluate import precision_at_k
from services.demo.fashion import (
    CLASS_PROMPTS,
    CLASS_SLUGS,
    CLASSES,
    label_of,
    load_split,
    parse_idx,
    read_idx,
    to_image,
    write_images,
)
from shared.ml.encoder import ClipEncoder

pytestmark = pytest.mark.slow  # trains the demo model

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written the way the format describes: magic, big-endian dims, payload."""
    code = _CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


# Class c lights the 7x7 cells where MASKS[c] is set: 1 + 1.5 c of them (nested), so the
# classes differ in brightness and shape and a few dozen steps can tell them apart.
MASKS = (np.random.default_rng(7).permutation(16) < 1 + 1.5 * np.arange(10)[:, None]).reshape(
    10, 4, 4
)
assert len({m.tobytes() for m in MASKS}) == 10


def synthetic_split(per_class: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 28x28 images of 10 classes, each lighting its MASKS cells; labels interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        lit = np.kron(MASKS[label], np.ones((7, 7), dtype=bool))
        images[i][lit] = 200 + label * 5
    return images, labels


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset cache holding the four IDX .gz files (synthetic), so nothing is downloaded."""
    cache = tmp_path_factory.mktemp("cache")
    where = cache / "some" / "dir"
    where.mkdir(parents=True)
    for prefix, per_class, seed in (("train", 40, 1), ("t10k", 5, 2)):
        images, labels = synthetic_split(per_class, seed=seed)
        (where / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (where / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return cache


def test_parse_idx_reads_shape_values_and_byte_order(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images)), images)
    wide = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    parsed = parse_idx(idx_bytes(wide))
    assert parsed.shape == (2, 3) and parsed.tolist() == wide.tolist()
    floats = np.array([0.5, -1.25], dtype=np.float32)
    assert parse_idx(idx_bytes(floats)).tolist() == [0.5, -1.25]
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    assert np.array_equal(read_idx(path), images)


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x07",
        b"\x00\x00\x42\x01",
        b"\x00\x00\x08\x01\x00\x00\x00\x05\x01",
    ],
)
def test_parse_idx_refuses_bad_files(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_idx(data)


def test_load_split_finds_files_anywhere_in_the_cache(fake_cache: Path) -> None:
    images, labels = load_split(fake_cache, "train")
    expected_images, expected_labels = synthetic_split(40, seed=1)
    assert images.dtype == np.uint8 and images.shape == (400, 28, 28)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    assert load_split(fake_cache, "test")[0].shape == (50, 28, 28)


def test_missing_apt_get_says_how_to_get_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.demo.fashion.shutil.which", lambda name: None)
    with pytest.raises(fashion.DatasetUnavailableError, match="dataset-fashion-mnist"):
        load_split(tmp_path, "test")


def test_write_images_layout_and_idempotence(fake_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    paths = write_images(out, cache_dir=fake_cache, per_class=3)
    assert len(paths) == 30 and len(set(paths)) == 30
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASS_SLUGS.values())
    for slug in CLASS_SLUGS.values():
        assert sorted(p.name for p in (out / slug).iterdir()) == [
            f"{slug}_{n}.png" for n in range(3)
        ]
    images, labels = load_split(fake_cache, "test")
    for path in paths:
        label = CLASSES.index(label_of(path))
        n = int(path.stem.rsplit("_", 1)[1])
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (112, 112)
            pixels = np.asarray(image)
        # The n-th test image of its class, upscaled; its lit cells are its class's.
        source = images[np.flatnonzero(labels == label)[n]]
        assert np.array_equal(pixels, np.asarray(to_image(source)))
        centres = pixels[14::28, 14::28, 0]  # the middle of each 7x7 cell, upscaled 4x
        assert np.array_equal(centres > 150, MASKS[label])
    before = {p: p.stat().st_mtime_ns for p in paths}
    paths[0].unlink()
    again = write_images(out, cache_dir=fake_cache, per_class=3)
    assert again == paths and paths[0].is_file()
    assert all(p.stat().st_mtime_ns == before[p] for p in paths[1:])
    with pytest.raises(ValueError, match="only 5 examples"):
        write_images(tmp_path / "more", cache_dir=fake_cache, per_class=6)


def test_every_class_prompt_is_a_training_caption() -> None:
    texts = {text: label for text, label in demo_train.captions()}
    assert [texts[CLASS_PROMPTS[name]] for name in CLASSES] == list(range(10))


def test_clip_loss_rewards_matching_pairs() -> None:
    labels = torch.tensor([0, 1, 2, 2])
    aligned = torch.eye(4)[[0, 1, 2, 2]]
    scale = torch.tensor(np.log(50.0))
    good = demo_train.clip_loss(aligned, aligned, labels, scale)
    bad = demo_train.clip_loss(aligned, aligned[[1, 2, 0, 0]], labels, scale)
    # Same-class pairs are positives of each other: the minimum is their entropy, log 2 / 2.
    assert good.item() == pytest.approx(np.log(2) / 2, abs=1e-3)
    assert bad.item() > good.item() + 10


@pytest.fixture(scope="module")
def trained(fake_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    return demo_train.train(
        out, cache_dir=fake_cache, steps=100, batch_size=64, warmup=10, threads=1
    )


def test_training_preprocessing_matches_the_served_processor(
    trained: Path, fake_cache: Path, tmp_path: Path
) -> None:
    encoder = ClipEncoder(model=str(trained), device="cpu", dtype="float32")
    paths = write_images(tmp_path / "png", cache_dir=fake_cache, per_class=1)
    images, labels = load_split(fake_cache, "test")
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    served = [Image.open(p).convert("RGB") for p in paths]
    expected = encoder.preprocess(served)
    used = demo_train.pixel_values(images[first], encoder.processor)
    assert expected.shape == (10, 3, 28, 28)
    assert torch.allclose(used, expected, atol=1e-6)


def test_short_training_saves_a_checkpoint_clip_encoder_loads(
    trained: Path, fake_cache: Path, tmp_path: Path
) -> None:
    config = json.loads((trained / "config.json").read_text())
    processor = json.loads((trained / "processor_config.json").read_text())
    assert config["vision_config"]["image_size"] == 28
    assert processor["image_processor"]["crop_size"] == {"height": 28, "width": 28}
    marker = json.loads((trained / demo_train.MARKER).read_text())
    assert marker["recipe"]["steps"] == 100 and marker["recipe"]["version"] == demo_train.VERSION

    encoder = ClipEncoder(model=str(trained), device="cpu", dtype="float32")
    texts = encoder.encode_texts(list(CLASS_PROMPTS.values()))
    paths = write_images(tmp_path / "png", cache_dir=fake_cache, per_class=5)
    with Image.open(paths[0]) as image:
        vectors = encoder.encode_images([image.convert("RGB")])
    assert texts.shape == (10, encoder.dim) and vectors.shape == (1, encoder.dim)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # 100 steps on an easy synthetic set already rank the right class first for each prompt.
    scores = precision_at_k(encoder, paths, [label_of(p) for p in paths], k=5)
    assert set(scores) == set(CLASSES)
    assert np.mean(list(scores.values())) >= 0.8, scores


def test_ensure_demo_model_reuses_a_matching_model(
    tmp_path: Path, fake_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_train(out: Path, **kwargs: object) -> Path:
        calls.append(1)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "vocab.json", "model.safetensors"):
            (out / name).write_text("{}")
        recipe = demo_train.Recipe(steps=kwargs["steps"], seed=kwargs["seed"])  # type: ignore[arg-type]
        marker = {"recipe": dataclasses.asdict(recipe)}
        (out / demo_train.MARKER).write_text(json.dumps(marker))
        return out

    monkeypatch.setattr(demo_train, "train", fake_train)
    out = tmp_path / "model"
    assert demo_train.ensure_demo_model(out, cache_dir=fake_cache, steps=7) == out
    assert demo_train.ensure_demo_model(out, cache_dir=fake_cache, steps=7) == out
    assert len(calls) == 1 and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.training")]
    demo_train.ensure_demo_model(out, cache_dir=fake_cache, steps=8)  # other recipe: retrain
    assert len(calls) == 2
    assert json.loads((out / demo_train.MARKER).read_text())["recipe"]["steps"] == 8
