"""The content-addressed blob store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.blobs import BlobStore
from shared.errors import NotFound


def test_put_get_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.put(b"hello")
    assert key == hashlib.sha256(b"hello").hexdigest()
    assert store.put(b"hello") == key and store.get(key) == b"hello"
    assert store.path(key).parent.parent.name == key[:2]
    assert store.delete(key) and not store.delete(key)
    with pytest.raises(NotFound):
        store.get(key)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"])
def test_keys_that_are_not_ids_never_become_paths(tmp_path: Path, bad: str) -> None:
    with pytest.raises(NotFound):
        BlobStore(tmp_path).path(bad)
