"""The CLIP encoder: a transformers CLIPModel and its own processor, batched, L2-normalised."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from shared.errors import ModelLoadError
from shared.preprocess import ClipPreprocess
from shared.settings import Settings

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    """CLIP_DEVICE resolved: auto means CUDA when there is one."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIP_DEVICE=cuda but no CUDA device is visible", code="no_cuda")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def fast_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as Linux reports it.

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """CLIP_DTYPE resolved: auto is float16 on CUDA, bfloat16 on CPUs that compute it
    natively (about 3.5x faster here; see BENCHMARKS.md for what it changes), else float32."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if fast_bfloat16() else torch.float32
    return _DTYPES[requested]


def _has_int8() -> bool:
    """Whether this torch has the eager int8 path (torch.ao dynamic quantization) and an engine
    for it (fbgemm/x86 on x86-64, qnnpack on ARM). torch says the API will move to torchao."""
    quantization = getattr(torch.ao, "quantization", None)
    if quantization is None or not hasattr(quantization, "quantize_dynamic"):
        return False
    return bool(set(torch.backends.quantized.supported_engines) - {"none"})


def int8_text(requested: str, *, dtype: str, device: torch.device) -> bool:
    """CLIP_TEXT_QUANT resolved: auto is int8 on CPUs unless CLIP_DTYPE=float32 asks for exact
    answers, and only where torch can do it; an explicit int8 it cannot do is an error."""
    if requested == "none":
        return False
    if device.type != "cpu":
        if requested == "int8":
            log.warning("CLIP_TEXT_QUANT=int8 applies on CPUs only; %s keeps CLIP_DTYPE", device)
        return False
    if requested == "int8":
        if not _has_int8():
            raise ModelLoadError(
                "CLIP_TEXT_QUANT=int8 but this torch build has no eager int8 path "
                "(torch.ao.quantization with an int8 engine); set CLIP_TEXT_QUANT=none",
                code="no_int8_engine",
            )
        return True
    return dtype != "float32" and _has_int8()


class Int8TextTower(torch.nn.Module):
    """A float32 copy of CLIP's text tower with int8 Linear weights, for texts encoded alone.

    A lone query's pass reads every weight once for a handful of tokens, so it is bound by
    memory bandwidth: int8 weights are half of bfloat16's bytes (3.9 ms a text against 6.4
    here, ViT-B/32, two threads). Activations are quantized per call with one scale for the
    whole input, so in a padded batch a text's vector would depend on its neighbours
    (cosine down to 0.998 against its own pass, measured): batches use the model's own
    tower. Weights get one scale per output channel; norms and embeddings are float32
    copies of the loaded model's values (so already rounded to CLIP_DTYPE; the precision
    bench measures the whole path). torch's eager int8 path (torch.ao) is the one with fast
    CPU kernels without torch.compile; it warns that it will move to torchao.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.text_model = copy.deepcopy(clip.text_model).float().eval()
        self.text_projection = copy.deepcopy(clip.text_projection).float().eval()
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        # torch.ao warns on every call that it moves to torchao: said once here instead.
        log.info("int8 text tower via torch.ao dynamic quantization (deprecated upstream)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                self,
                {"text_model": qconfig, "text_projection": qconfig},
                dtype=torch.qint8,
                mapping={torch.nn.Linear: torch.ao.nn.quantized.dynamic.Linear},
                inplace=True,
            )
        _give_back_freed_memory()  # the float32 copies just dropped: ~150 MB kept otherwise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The projected text features, as CLIPModel.get_text_features computes them."""
        pooled = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).pooler_output
        features: torch.Tensor = self.text_projection(pooled)
        return features


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the OS where the C library can (glibc's malloc_trim)."""
    gc.collect()  # the swapped-out modules sit in reference cycles
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projection;
    # older releases return the tensor itself.
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features


Tower = Literal["image", "text"]
BOTH: frozenset[Tower] = frozenset({"image", "text"})
IMAGE_ONLY: frozenset[Tower] = frozenset({"image"})  # what a worker loads


def drop_towers(model: torch.nn.Module, keep: frozenset[Tower]) -> list[str]:
    """Remove the submodules of the towers not in `keep`; the names removed.

    Dual encoders name their parts after the tower (`text_model`, `text_projection`,
    `vision_model`, `visual_projection`), so a part is the text tower's when its name says
    "text", the image tower's when it says "vision" or "visual".
    """
    dropped = []
    for name, _ in list(model.named_children()):
        tower: Tower | None = (
            "text" if "text" in name else "image" if "vision" in name or "visual" in name else None
        )
        if tower is not None and tower not in keep:
            setattr(model, name, None)
            dropped.append(name)
    if dropped:
        _give_back_freed_memory()
    return dropped


class ClipEncoder:
    """Loads CLIP_MODEL once and encodes images and texts into unit-length vectors.

    A process keeps only the towers it runs (`towers`): a worker the image tower, the query
    service the text tower (and the image tower where image search is on).
    """

    def __init__(
        self,
        *,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        text_quant: str = "none",
        towers: frozenset[Tower] = BOTH,
    ) -> None:
        self.name = model
        self.towers = towers
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        try:
            self.processor: Any = AutoProcessor.from_pretrained(model)  # type: ignore[no-untyped-call]
            clip: Any = CLIPModel.from_pretrained(model, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            where = "directory" if Path(model).exists() else "hub id"
            raise ModelLoadError(
                f"cannot load CLIP model {model!r} ({where}): {exc}. Set CLIP_MODEL to a local "
                "directory with a CLIP checkpoint saved by save_pretrained (config, weights, "
                "tokenizer and preprocessor files), or make the Hugging Face hub reachable.",
                code="model_unavailable",
            ) from exc
        drop_towers(clip, towers)
        self.model: Any = clip.to(self.device).eval()
        self.text_int8 = "text" in towers and int8_text(text_quant, dtype=dtype, device=self.device)
        self._solo: Int8TextTower | None = None
        if self.text_int8:
            try:
                self._solo = Int8TextTower(clip)
            except Exception as exc:  # auto falls back; an explicit int8 says why it cannot
                if text_quant == "int8":
                    raise ModelLoadError(
                        f"CLIP_TEXT_QUANT=int8 failed: {exc}", code="no_int8_engine"
                    ) from exc
                log.warning("int8 text tower unavailable, texts stay in %s: %s", self.dtype, exc)
                self.text_int8 = False
        self.dim = int(clip.config.projection_dim)
        self.max_tokens = int(clip.config.text_config.max_position_embeddings)
        self._fast = ClipPreprocess.from_processor(self.processor.image_processor)
        self.input_size = int(clip.config.vision_config.image_size)
        # One forward pass at a time per process; torch already uses every core.
        self._lock = threading.Lock()
        log.info(
            "loaded %s (%s) on %s as %s%s (dim %d)",
            model,
            " and ".join(f"{t} tower" for t in sorted(towers)),
            self.device,
            self.dtype,
            ", int8 text tower for single texts" if self.text_int8 else "",
            self.dim,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, towers: frozenset[Tower]) -> ClipEncoder:
        """The encoder that CLIP_MODEL, CLIP_DEVICE and CLIP_DTYPE describe, with `towers`
        only; CLIP_TEXT_QUANT applies to the text tower."""
        return cls(
            model=settings.clip_model,
            device=settings.clip_device,
            dtype=settings.clip_dtype,
            text_quant=settings.clip_text_quant if "text" in towers else "none",
            towers=towers,
        )

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One RGB image's pixel values, as the model's own image processor makes them.

        Thread-safe and mostly GIL-free: the worker runs it in a pool beside the model.
        """
        if self._fast is not None:
            return self._fast(image)
        pixels: torch.Tensor = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        return pixels[0]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values for a batch of RGB images."""
        return torch.stack([self.prepare(image) for image in images])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit vectors for preprocessed pixel values, in one forward pass."""
        with self._lock:
            out = self.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype, non_blocking=True)
            )
        return _normalise(_features(out))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit vectors for a batch of RGB images."""
        return self.encode_pixels(self.preprocess(images))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for texts, each truncated to the model's context length.

        With CLIP_TEXT_QUANT resolved to int8, a single text goes through the int8 copy of
        the text tower and a batch through the model's own (see Int8TextTower).
        """
        if "text" not in self.towers:
            raise RuntimeError(f"this process loaded {self.name!r} without its text tower")
        tokens = self.processor.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        with self._lock:
            if self._solo is not None and len(texts) == 1:
                return _normalise(self._solo(ids, mask))
            out = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        return _normalise(_features(out))

    def warmup(self) -> None:
        """Run every tower loaded once so the first real request is not the slow one."""
        if "text" in self.towers:
            self.encode_texts(["warm up"])
            self.encode_texts(["warm up", "a batch"])
        if "image" in self.towers:
            self.encode_images([Image.new("RGB", (64, 64))])


def _normalise(features: torch.Tensor) -> np.ndarray:
    vectors = features.float()
    vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    array: np.ndarray = vectors.cpu().numpy()
    return array
