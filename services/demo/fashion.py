"""Fashion-MNIST (MIT) from Debian's `dataset-fashion-mnist` package: IDX parsing, PNG export.

The package is fetched once with `apt-get download` into a cache directory and unpacked there
(`dpkg-deb -x`, or a pure-Python fallback for the .deb's ar/tar layers); nothing is installed.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

PACKAGE = "dataset-fashion-mnist"
PACKAGE_URL = "https://packages.debian.org/bookworm/all/dataset-fashion-mnist/download"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASS_SLUGS: dict[str, str] = {
    "T-shirt/top": "tshirt_top",
    "Trouser": "trouser",
    "Pullover": "pullover",
    "Dress": "dress",
    "Coat": "coat",
    "Sandal": "sandal",
    "Shirt": "shirt",
    "Sneaker": "sneaker",
    "Bag": "bag",
    "Ankle boot": "ankle_boot",
}
CLASS_PROMPTS: dict[str, str] = {
    "T-shirt/top": "a photo of a t-shirt",
    "Trouser": "a photo of trousers",
    "Pullover": "a photo of a pullover",
    "Dress": "a photo of a dress",
    "Coat": "a photo of a coat",
    "Sandal": "a photo of a sandal",
    "Shirt": "a photo of a shirt",
    "Sneaker": "a photo of a sneaker",
    "Bag": "a photo of a bag",
    "Ankle boot": "a photo of an ankle boot",
}
IMAGE_SIZE = 112  # side of the written PNGs (28x28 upscaled 4x)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetUnavailableError(RuntimeError):
    """Fashion-MNIST could not be fetched or found in the cache directory."""


def parse_idx(data: bytes) -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into an array of its shape and type."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file: bad magic number")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("IDX file truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"IDX payload is {len(data) - header} bytes, shape {shape} needs "
            f"{count * dtype.itemsize}"
        )
    array: np.ndarray = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gunzipping it when its name ends in .gz."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return parse_idx(data)


def _find_idx_dir(root: Path) -> Path | None:
    for hit in sorted(root.rglob(_FILES["train"][0])):
        if all((hit.parent / name).is_file() for pair in _FILES.values() for name in pair):
            return hit.parent
    return None


def _extract_deb(deb: Path, dest: Path) -> None:
    if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return
    # A .deb is an ar archive; its data member is a (compressed) tar of the files.
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DatasetUnavailableError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            raw = lzma.decompress(body) if name.endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size % 2)
    raise DatasetUnavailableError(f"{deb} has no data.tar member")


def _find_or_download_deb(cache_dir: Path, tmp: Path) -> Path:
    debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"))
    if debs:  # placed there by hand (no apt-get)
        return debs[-1]
    if not shutil.which("apt-get"):
        raise DatasetUnavailableError(
            f"apt-get is not available to fetch Debian's {PACKAGE} package. Download the .deb "
            f"from {PACKAGE_URL} and put it in {cache_dir}, or place the four Fashion-MNIST "
            f"IDX .gz files (train/t10k images/labels) anywhere under {cache_dir}."
        )
    proc = subprocess.run(
        ["apt-get", "download", "-q", PACKAGE],
        cwd=tmp,
        capture_output=True,
        text=True,
        check=False,
    )
    fetched = sorted(tmp.glob(f"{PACKAGE}_*.deb"))
    if proc.returncode != 0 or not fetched:
        raise DatasetUnavailableError(
            f"`apt-get download {PACKAGE}` failed ({proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}. Check the Debian sources (`apt-get update`), or "
            f"download the .deb from {PACKAGE_URL} and put it in {cache_dir}."
        )
    return fetched[-1]


def ensure_dataset(cache_dir: Path) -> Path:
    """The directory holding the four Fashion-MNIST IDX .gz files, fetched once into cache_dir."""
    cache_dir = cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = _find_idx_dir(cache_dir)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        deb = _find_or_download_deb(cache_dir, Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        _extract_deb(deb, unpacked)
        src = _find_idx_dir(unpacked)
        if src is None:
            raise DatasetUnavailableError(f"{deb.name} holds no Fashion-MNIST IDX files")
        dest = cache_dir / "fashion-mnist"
        dest.mkdir(exist_ok=True)
        for pair in _FILES.values():
            for name in pair:
                (src / name).replace(dest / name)
    return dest


def load_split(cache_dir: Path, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, fetched once."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    where = ensure_dataset(cache_dir)
    images_name, labels_name = _FILES[split]
    images = read_idx(where / images_name)
    labels = read_idx(where / labels_name).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected IDX shapes {images.shape} and {labels.shape}")
    return images.astype(np.uint8), labels


def to_image(pixels: np.ndarray, *, size: int = IMAGE_SIZE) -> Image.Image:
    """One 28x28 grey image as an RGB PIL image of side `size` (Lanczos upscaling)."""
    grey = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.LANCZOS)
    return grey.convert("RGB")


def select_per_class(labels: np.ndarray, *, per_class: int) -> list[int]:
    """Indices of the first `per_class` examples of each class, class by class."""
    picked: list[int] = []
    for label in range(len(CLASSES)):
        hits = np.flatnonzero(labels == label)[:per_class]
        if len(hits) < per_class:
            raise ValueError(f"only {len(hits)} examples of {CLASSES[label]!r}")
        picked.extend(int(i) for i in hits)
    return picked


def image_path(out_dir: Path, label: int, n: int) -> Path:
    """Where write_images puts the n-th image of class `label`."""
    slug = CLASS_SLUGS[CLASSES[label]]
    return out_dir / slug / f"{slug}_{n}.png"


def label_of(path: Path) -> str:
    """The class name of an image written by write_images (from its folder)."""
    by_slug = {slug: name for name, slug in CLASS_SLUGS.items()}
    return by_slug[path.parent.name]


def write_images(
    out_dir: Path,
    *,
    cache_dir: Path,
    per_class: int,
    split: Literal["train", "test"] = "test",
    size: int = IMAGE_SIZE,
) -> list[Path]:
    """Write `per_class` PNGs of each class as out_dir/<slug>/<slug>_<n>.png (existing kept)."""
    wanted = [
        image_path(out_dir, label, n) for label in range(len(CLASSES)) for n in range(per_class)
    ]
    if all(path.is_file() for path in wanted):
        return wanted
    images, labels = load_split(cache_dir, split)
    for index, path in zip(select_per_class(labels, per_class=per_class), wanted, strict=True):
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        to_image(images[index], size=size).save(tmp, format="PNG")
        tmp.replace(path)
    return wanted
