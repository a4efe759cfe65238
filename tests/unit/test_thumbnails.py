"""Thumbnails: fixed sizes, reduced-scale decoding, a bounded cache purged on delete."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.gateway import thumbnails
from services.gateway.ratelimit import RateLimited
from services.gateway.thumbnails import ThumbnailCache, render
from shared.errors import InvalidInput
from tests.images import encode, make_image


def _stored(gw: Any, data: bytes) -> str:
    image_id: str = gw.blobs.put(data)
    assert image_id == hashlib.sha256(data).hexdigest()
    return image_id


def test_only_configured_sizes_are_served(gateway_app: Any) -> None:
    client, gw = gateway_app()
    image_id = _stored(gw, encode(make_image(1, size=(300, 200))))
    ok = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 128})
    assert ok.status_code == 200 and ok.content[:2] == b"\xff\xd8"
    assert max(Image.open(io.BytesIO(ok.content)).size) == 128
    for size in (100, 16, 1024, 4096):
        refused = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": size})
        assert refused.status_code == 422, size
        body = refused.json()
        assert body["code"] == "unsupported_thumbnail_size"
        assert "64, 128, 256, 512" in body["detail"]
    default = client.get(f"/v1/images/{image_id}/thumbnail")
    assert default.status_code == 200


def test_a_deleted_images_thumbnail_is_404_and_purged(gateway_app: Any, tmp_path: Path) -> None:
    client, gw = gateway_app()
    image_id = _stored(gw, encode(make_image(2, size=(320, 240))))
    for size in (64, 128):
        assert client.get(f"/v1/images/{image_id}/thumbnail", params={"size": size}).is_success
    cached = list((tmp_path / "thumbs").glob(f"*/*/{image_id}.jpg"))
    assert len(cached) == 2

    assert client.delete(f"/v1/images/{image_id}").json()["deleted"] is True
    assert client.get(f"/v1/images/{image_id}").status_code == 404
    gone = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 128})
    assert gone.status_code == 404
    assert gone.json()["code"] == "image_not_found"
    assert not list((tmp_path / "thumbs").glob(f"*/*/{image_id}.jpg"))


def test_a_thumbnail_is_not_served_from_cache_once_its_blob_is_gone(
    gateway_app: Any,
) -> None:
    """Another gateway deleted it (its cache here was not purged): still 404."""
    client, gw = gateway_app()
    image_id = _stored(gw, encode(make_image(3)))
    assert client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 64}).is_success
    gw.blobs.delete(image_id)
    assert client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 64}).status_code == 404


def test_cache_control_is_private_when_reads_need_a_key(gateway_app: Any) -> None:
    client, gw = gateway_app()
    image_id = _stored(gw, encode(make_image(4)))
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumbnail?size=64"):
        assert client.get(path).headers["cache-control"].startswith("public"), path

    client, gw = gateway_app(API_KEYS="a-real-key-0123456789", API_KEYS_ON_READS="true")
    headers = {"Authorization": "Bearer a-real-key-0123456789"}
    for path in (f"/v1/images/{image_id}", f"/v1/images/{image_id}/thumbnail?size=64"):
        answer = client.get(path, headers=headers)
        assert answer.status_code == 200, path
        cache = answer.headers["cache-control"]
        assert cache.startswith("private") and "public" not in cache, path


def test_thumbnails_are_rate_limited(gateway_app: Any) -> None:
    client, gw = gateway_app()
    image_id = _stored(gw, encode(make_image(5)))
    scopes = []

    class Limits:
        async def hit(self, scope: str, identity: str) -> None:
            scopes.append(scope)
            raise RateLimited("too many thumbnails", retry_after=7)

    gw.rate_limits = Limits()
    answer = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 64})
    assert answer.status_code == 429
    assert answer.json()["code"] == "rate_limited"
    assert answer.headers["retry-after"] == "7"
    assert scopes == ["thumbnails"]


def _decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image converted (the first conversion is of the decoded image)."""
    seen: list[tuple[int, int]] = []
    original = Image.Image.convert

    def convert(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        seen.append(self.size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", convert)
    return seen


def test_jpegs_are_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(make_image(6, size=(4000, 3000)), quality=80)
    seen = _decoded_sizes(monkeypatch)
    out = Image.open(io.BytesIO(render(data, size=64)))
    assert out.size == (64, 48)
    assert seen[0] == (500, 375)  # the decoder's 1/8 scale, never the 12 MP original


def test_other_formats_are_reduced_before_resampling(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(make_image(7, size=(2048, 1024)), "PNG")
    factors: list[int] = []
    original = Image.Image.reduce

    def reduce(self: Image.Image, factor: Any, box: Any = None) -> Image.Image:
        factors.append(factor)
        return original(self, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", reduce)
    out = Image.open(io.BytesIO(render(data, size=128)))
    assert out.size == (128, 64)
    assert factors == [8]  # 2048 / 8 = 256: within 2x of the target, then LANCZOS


def test_exif_orientation_is_applied_after_reducing() -> None:
    image = make_image(8, size=(1600, 800))
    exif = Image.Exif()
    exif[thumbnails.ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    for fmt in ("JPEG", "PNG"):
        data = encode(image, fmt, exif=exif.tobytes())
        out = Image.open(io.BytesIO(render(data, size=128)))
        assert out.size == (64, 128), fmt


def test_undecodable_bytes_are_a_422() -> None:
    with pytest.raises(InvalidInput) as info:
        render(b"not an image", size=64)
    assert info.value.code == "decode_failed"


def test_the_cache_stays_within_its_byte_bound(tmp_path: Path) -> None:
    cache = ThumbnailCache(tmp_path, max_bytes=10_000)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(30)]
    for n, image_id in enumerate(ids):
        cache.put(image_id, 64, bytes([n]) * 1_000)
        used = sum(p.stat().st_size for p in tmp_path.glob("*/*/*.jpg"))
        assert used <= 10_000
    assert cache.get(ids[-1], 64) == bytes([29]) * 1_000  # the newest stay
    assert cache.get(ids[0], 64) is None  # the oldest went
    # A file over the whole bound is not kept; a bound of 0 keeps nothing.
    cache.put(ids[0], 64, b"x" * 10_001)
    assert cache.get(ids[0], 64) is None
    ThumbnailCache(tmp_path / "none", max_bytes=0).put(ids[0], 64, b"x")
    assert not (tmp_path / "none").exists()


def test_recently_served_thumbnails_are_evicted_last(tmp_path: Path) -> None:

    cache = ThumbnailCache(tmp_path, max_bytes=3_500)
    a, b, c, d = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c", b"d"))
    for n, image_id in enumerate((a, b, c)):
        cache.put(image_id, 64, b"x" * 1_000)
        path = cache.path(image_id, 64)
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
    assert cache.get(a, 64) is not None  # a is now the most recently used
    cache.put(d, 64, b"x" * 1_000)  # 4,000 > 3,500: evict down to 3,150
    assert cache.get(b, 64) is None
    assert cache.get(a, 64) is not None and cache.get(c, 64) is not None
