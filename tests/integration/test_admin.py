"""`clipsearch admin check` on the real stack: drift between bytes, vectors and job records
is found, and --repair mends it."""

from __future__ import annotations

import httpx

from services.stack import Stack
from shared.blobs import BlobStore
from shared.vectors import VectorStore
from tests.conftest import upload, wait_for_job
from tests.images import encode, make_image
from tests.integration.test_cli import run


def test_check_finds_drift_and_repair_mends_it(api: httpx.Client, stack: Stack) -> None:
    files = [(f"adm{i}.jpg", encode(make_image(31_000 + i))) for i in range(6)]
    job_id = upload(api, files).json()["job_id"]
    assert wait_for_job(api, job_id)["state"] == "succeeded"
    store = VectorStore(
        uri=stack.settings.milvus_uri, token=None, collection=stack.settings.milvus_collection
    )
    rows = store.client.query(
        store.collection,
        filter=f'job_id == "{job_id}"',
        output_fields=["image_id"],
        consistency_level="Strong",
    )
    mine = sorted(r["image_id"] for r in rows)
    assert len(mine) == 6
    lost_bytes, lost_vector = mine[0], mine[1]
    assert BlobStore(stack.settings.blob_dir).delete(lost_bytes)  # a vector without bytes
    store.remove([lost_vector])  # bytes without a vector

    found = api.post("/v1/admin/check", json={"grace_seconds": 0}).json()
    assert lost_vector in found["bytes_without_vectors"]["sample"]
    assert lost_bytes in found["vectors_without_bytes"]["sample"]
    assert found["clean"] is False and found["repair_job_id"] is None

    code, out, _ = run("--url", stack.gateway_url, "admin", "check")
    assert code == 1 and "drift found" in out

    repaired = api.post("/v1/admin/check", json={"repair": True, "grace_seconds": 0}).json()
    assert repaired["removed_vectors"] >= 1 and repaired["repair_job_id"]
    job = wait_for_job(api, repaired["repair_job_id"])
    assert job["state"] == "succeeded" and job["done"] >= 1
    indexed = api.post("/v1/images/lookup", json={"image_ids": [lost_vector]}).json()
    assert indexed["indexed"] == [lost_vector]
    after = api.post("/v1/admin/check", json={"grace_seconds": 0}).json()
    assert lost_vector not in after["bytes_without_vectors"]["sample"]
    assert lost_bytes not in after["vectors_without_bytes"]["sample"]
    hits = api.get("/v1/search", params={"q": "anything", "k": 200}).json()["hits"]
    assert lost_bytes not in {h["image_id"] for h in hits}
