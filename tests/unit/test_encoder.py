"""The encoder: real transformers loading, unit vectors, truncation, clear load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shared.ml.encoder as encoder_module
import shared.ml.policy as policy_module
from shared.errors import ModelLoadError
from shared.ml.encoder import BOTH, IMAGE_ONLY, ClipEncoder
from shared.ml.policy import fast_bfloat16, int8_text, pick_dtype
from tests.images import make_image


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> ClipEncoder:
    return ClipEncoder(model=str(tiny_model), device="cpu", dtype="float32")


def test_a_worker_holds_the_image_tower_only(tiny_model: Path, encoder: ClipEncoder) -> None:
    worker = ClipEncoder(model=str(tiny_model), device="cpu", dtype="float32", towers=IMAGE_ONLY)
    names = {name.split(".")[0] for name, _ in worker.model.named_parameters()}
    assert not any("text" in name for name in names) and "vision_model" in names
    both = sum(p.numel() for p in encoder.model.parameters())
    assert sum(p.numel() for p in worker.model.parameters()) < both
    images = [make_image(i) for i in range(3)]
    assert np.allclose(worker.encode_images(images), encoder.encode_images(images), atol=1e-6)
    with pytest.raises(RuntimeError, match="without its text tower"):
        worker.encode_texts(["a dog"])


def test_vectors_are_unit_length_and_batch_independent(encoder: ClipEncoder) -> None:
    images = [make_image(i) for i in range(5)]
    batch = encoder.encode_images(images)
    single = np.stack([encoder.encode_images([im])[0] for im in images])
    assert batch.shape == (5, encoder.dim)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert np.allclose(batch, single, atol=1e-5)


def test_long_text_is_truncated_not_refused(encoder: ClipEncoder) -> None:
    vectors = encoder.encode_texts(["dog " * 5000, "a dog"])
    assert vectors.shape == (2, encoder.dim) and np.isfinite(vectors).all()


def test_real_clip_tokenizer_ids(encoder: ClipEncoder) -> None:
    ids = encoder.processor.tokenizer("a white dog on a beach")["input_ids"]
    assert ids == [49406, 320, 1579, 1929, 525, 320, 2117, 49407]


def test_bfloat16_stays_close_to_float32(tiny_model: Path, encoder: ClipEncoder) -> None:
    bf16 = ClipEncoder(model=str(tiny_model), device="cpu", dtype="bfloat16")
    images = [make_image(i) for i in range(8)]
    cos = (bf16.encode_images(images) * encoder.encode_images(images)).sum(axis=1)
    assert cos.min() > 0.98


def test_missing_model_names_the_model_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        ClipEncoder(model=str(tmp_path / "no-such-model"))
    assert "no-such-model" in err.value.detail and "CLIP_MODEL" in err.value.detail


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    avx = tmp_path / "avx"
    avx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nbugs\t: avx512_bf16\n")
    assert fast_bfloat16(amx) and fast_bfloat16(avx)
    assert not fast_bfloat16(old) and not fast_bfloat16(tmp_path / "missing")
    monkeypatch.setattr(policy_module, "fast_bfloat16", lambda: False)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(policy_module, "fast_bfloat16", lambda: True)
    assert pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_padded_batch_of_texts_equals_one_at_a_time(encoder: ClipEncoder) -> None:
    # The query service batches concurrent queries: padding must not change any vector.
    texts = ["a dog", "two cats sleeping on a red sofa in the sun", "x", "a dog"]
    batch = encoder.encode_texts(texts)
    single = np.stack([encoder.encode_texts([t])[0] for t in texts])
    assert np.allclose(batch, single, atol=1e-5)


def test_blank_image_encodes(encoder: ClipEncoder) -> None:
    assert encoder.encode_images([Image.new("RGB", (1, 1))]).shape == (1, encoder.dim)


@pytest.fixture(scope="module")
def int8(tiny_model: Path) -> ClipEncoder:
    return ClipEncoder(model=str(tiny_model), device="cpu", dtype="bfloat16", text_quant="int8")


def test_int8_tower_is_a_quantized_copy_beside_the_model(int8: ClipEncoder) -> None:
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert int8.text is not None
    solo = int8.text.solo
    assert solo is not None
    assert not [m for m in solo.modules() if type(m) is torch.nn.Linear], "a float Linear left"
    assert isinstance(solo.text_projection, dynamic)
    # The model itself is untouched: batches and images still run in its own dtype.
    assert all(p.dtype == torch.bfloat16 for p in int8.model.parameters())


def test_int8_texts_stay_close_to_float32(int8: ClipEncoder, encoder: ClipEncoder) -> None:
    texts = ["a dog", "two cats sleeping on a red sofa in the sun", "a white dog on a beach"]
    alone = np.stack([int8.encode_texts([t])[0] for t in texts])
    assert np.allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    assert (alone * encoder.encode_texts(texts)).sum(axis=1).min() > 0.99
    # A batch goes through the bfloat16 tower, not the int8 one, yet says the same.
    batch = int8.encode_texts(texts)
    assert not np.array_equal(batch, alone)
    assert (batch * alone).sum(axis=1).min() > 0.99


def test_a_text_alone_always_gets_the_same_vector(int8: ClipEncoder) -> None:
    first = int8.encode_texts(["a red car at night"])
    int8.encode_texts(["something else entirely", "and more"])
    assert np.array_equal(int8.encode_texts(["a red car at night"]), first)


def test_int8_text_only_where_asked_or_where_answers_may_move() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert int8_text("int8", dtype="float32", device=cpu)
    assert int8_text("auto", dtype="auto", device=cpu)
    assert int8_text("auto", dtype="bfloat16", device=cpu)
    assert not int8_text("auto", dtype="float32", device=cpu)  # exact answers asked for
    assert not int8_text("auto", dtype="auto", device=cuda)
    assert not int8_text("none", dtype="auto", device=cpu)


def test_only_the_query_side_quantizes_texts(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.settings import Settings

    monkeypatch.setenv("CLIP_MODEL", str(tiny_model))
    monkeypatch.setenv("CLIP_DEVICE", "cpu")
    monkeypatch.setenv("CLIP_DTYPE", "bfloat16")
    monkeypatch.setenv("CLIP_TEXT_QUANT", "auto")
    settings = Settings()
    assert ClipEncoder.from_settings(settings, towers=BOTH).text_int8
    assert not ClipEncoder.from_settings(settings, towers=IMAGE_ONLY).text_int8  # a worker's


def test_int8_falls_back_under_auto_and_fails_clearly_when_asked(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(clip: object) -> None:
        raise AttributeError("module 'torch.ao' has no attribute 'quantization'")

    monkeypatch.setattr(encoder_module, "Int8TextTower", broken)
    fallback = ClipEncoder(model=str(tiny_model), device="cpu", dtype="bfloat16", text_quant="auto")
    assert not fallback.text_int8 and fallback.encode_texts(["a dog"]).shape == (1, fallback.dim)
    with pytest.raises(ModelLoadError) as err:
        ClipEncoder(model=str(tiny_model), device="cpu", dtype="bfloat16", text_quant="int8")
    assert err.value.code == "no_int8_engine" and "CLIP_TEXT_QUANT" in err.value.detail
    monkeypatch.setattr(policy_module, "_has_int8", lambda: False)
    assert not int8_text("auto", dtype="auto", device=torch.device("cpu"))
    with pytest.raises(ModelLoadError):
        int8_text("int8", dtype="auto", device=torch.device("cpu"))
