"""The end of a chaos run: drain, then check every accepted image, every job, and search."""

from __future__ import annotations

import io
import random
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from services.stack import Stack
from shared.vectors import SearchFilters, VectorStore
from tests.chaos.load import FINAL, PROMPTS, Record
from tests.images import encode, make_image

QUERY_LIMIT = 16_384  # Milvus's largest query page
CHECK_PROMPTS = PROMPTS + [
    f"{a} {b}"
    for a in ("a blue", "a green", "two yellow", "a dark")
    for b in ("circle", "square", "house", "bird")
]


def drain(rec: Record, url: str, timeout_s: float) -> list[str]:
    """Wait until every accepted job is final; the ids still open after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as api:
        while True:
            open_ids = []
            for job in list(rec.jobs.values()):
                if job.last.get("state") in FINAL:
                    continue
                try:
                    r = api.get(f"/v1/jobs/{job.job_id}")
                except httpx.HTTPError:
                    open_ids.append(job.job_id)
                    continue
                if r.status_code == 200:
                    job.last = r.json()
                else:
                    job.last = {"state": f"http {r.status_code}"}
                if job.last.get("state") not in FINAL:
                    open_ids.append(job.job_id)
            if not open_ids or time.monotonic() > deadline:
                return open_ids
            time.sleep(0.5)


def _store(stack: Stack) -> VectorStore:
    s = stack.settings
    return VectorStore(uri=s.milvus_uri, token=None, collection=s.milvus_collection)


def check_jobs(rec: Record, stack: Stack) -> dict[str, Any]:
    """Each job: final counts exact; its rows in Milvus are its images, each once."""
    store = _store(stack)
    bad_counts, bad_rows = [], []
    for job in rec.jobs.values():
        n, last = len(job.images), job.last
        counts = (last.get("state"), last.get("done"), last.get("failed"), last.get("duplicates"))
        if counts != ("succeeded", n, 0, 0) or last.get("total") != n:
            bad_counts.append({"job_id": job.job_id, "images": n, "got": last})
        rows = store.client.query(
            store.collection,
            filter=SearchFilters(job_id=job.job_id).expression(),
            output_fields=["image_id"],
            consistency_level="Strong",
            limit=10_000,
        )
        ids = [r["image_id"] for r in rows]
        if len(ids) != len(set(ids)) or set(ids) != set(job.images):
            missing = sorted(set(job.images) - set(ids))
            bad_rows.append(
                {"job_id": job.job_id, "images": n, "rows": len(ids), "missing": missing}
            )
    return {"bad_counts": bad_counts, "bad_rows": bad_rows}


def all_rows(stack: Stack) -> list[dict[str, Any]]:
    """Every row in the collection (image_id, job_id, vector), strongly consistent."""
    store = _store(stack)
    rows: list[dict[str, Any]] = store.client.query(
        store.collection,
        filter="",
        output_fields=["image_id", "job_id", "vector"],
        consistency_level="Strong",
        limit=QUERY_LIMIT,
    )
    if len(rows) >= QUERY_LIMIT:
        raise SystemExit(f"more than {QUERY_LIMIT} rows: lower --max-images")
    return rows


def check_collection(rec: Record, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole collection: each accepted image once, nothing else but refused uploads' images."""
    accepted = {i: j.job_id for j in rec.jobs.values() for i in j.images}
    refused = {i for g in rec.given_up for i in g["images"]}
    ids = [r["image_id"] for r in rows]
    return {
        "rows": len(ids),
        "distinct": len(set(ids)),
        "missing": sorted(set(accepted) - set(ids)),
        "refused_but_indexed": sorted(set(ids) & refused),
        "unknown": sorted(set(ids) - set(accepted) - refused),
    }


def _model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, CLIPModel

    return AutoProcessor.from_pretrained(model_dir), CLIPModel.from_pretrained(model_dir).eval()


def check_search(
    rec: Record, stack: Stack, rows: list[dict[str, Any]], model_dir: Path, k: int
) -> dict[str, Any]:
    """Searches against cosine over the stored vectors; stored vectors against the model."""
    import torch

    processor, model = _model(model_dir)
    ids = [r["image_id"] for r in rows]
    matrix = np.asarray([r["vector"] for r in rows], dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    mismatches, approximate = [], []
    with torch.inference_mode():
        for prompt in CHECK_PROMPTS:
            tokens = processor.tokenizer([prompt], padding=True, return_tensors="pt")
            text = model.get_text_features(**tokens).pooler_output[0].numpy()
            text = text / np.linalg.norm(text)
            scores = matrix @ text
            by_id = dict(zip(ids, scores, strict=True))
            expected = [ids[i] for i in np.argsort(-scores, kind="stable")[:k]]
            params: dict[str, Any] = {"q": prompt, "k": k}
            body = httpx.get(f"{stack.gateway_url}/v1/search", params=params, timeout=60)
            got = [h["image_id"] for h in body.raise_for_status().json()["hits"]]
            if _same(got, expected, by_id):
                continue
            miss = {"prompt": prompt, "got": got, "expected": expected}
            # An approximate index (HNSW) may miss a near neighbour; searched exhaustively
            # (ef = rows) Milvus must find them all, else a row is not searchable.
            if stack.settings.milvus_index != "FLAT" and _same(
                _exhaustive(stack, text, k, len(ids)), expected, by_id
            ):
                approximate.append(miss)
            else:
                mismatches.append(miss)
        # The stored vectors are the model's own: re-encode a sample from the images' seeds.
        seeds = {i: s for j in rec.jobs.values() for i, s in j.images.items()}
        sample = random.Random(0).sample(sorted(set(ids) & set(seeds)), min(20, len(ids)))
        worst = 1.0
        for image_id in sample:
            image = Image.open(io.BytesIO(encode(make_image(seeds[image_id])))).convert("RGB")
            pixels = processor(images=[image], return_tensors="pt")
            vec = model.get_image_features(**pixels).pooler_output[0].numpy()
            cos = float(matrix[ids.index(image_id)] @ (vec / np.linalg.norm(vec)))
            worst = min(worst, cos)
    # The worker may decode a large JPEG at reduced scale (DECODE_DRAFT): the cosine is close
    # to 1, not equal; a wrong or mixed-up vector is far below.
    return {
        "index": stack.settings.milvus_index,
        "prompts": len(CHECK_PROMPTS),
        "k": k,
        "mismatches": mismatches,
        "approximate_misses": approximate,
        "sample_min_cos": worst,
    }


def _same(got: list[str], expected: list[str], by_id: dict[str, float]) -> bool:
    """The same ids in the same order, up to ties (scores equal within float tolerance)."""
    return len(got) == len(expected) and all(
        g == e or abs(by_id.get(g, -9) - by_id[e]) < 1e-5
        for g, e in zip(got, expected, strict=True)
    )


def _exhaustive(stack: Stack, text: np.ndarray, k: int, rows: int) -> list[str]:
    store = _store(stack)
    result = store.client.search(
        store.collection,
        data=[text.astype(np.float32).tolist()],
        limit=k,
        search_params={"params": {"ef": max(k, min(rows, 32_768))}},
        consistency_level="Strong",
    )
    return [str(hit.id) for hit in result[0]]


def admin_check(stack: Stack) -> dict[str, Any]:
    """`clipsearch admin check` through the gateway: blobs vs Milvus vs job records, after the
    run (no grace period: every upload has ended)."""
    with httpx.Client(base_url=stack.gateway_url, timeout=300) as api:
        response = api.post("/v1/admin/check", json={"grace_seconds": 0})
    if response.status_code != 200:
        return {"clean": False, "error": f"{response.status_code}: {response.text[:300]}"}
    report: dict[str, Any] = response.json()
    return report


def scan_logs(log_dir: Path) -> dict[str, Any]:
    """What the services said about recovery: sweeper resends, lost batches, errors by log."""
    resent = re.compile(r"stalled: sent (\d+) uncounted images again")
    indexed = re.compile(
        r"^(\S+ \S+) INFO services\.worker\.pipeline: .* batch of \d+: [1-9]\d* indexed"
    )
    out: dict[str, Any] = {"sweeper_resends": 0, "sweeper_resent_images": 0, "errors": {}}
    out["indexed_at"] = []  # wall-clock times of worker log lines: a batch indexed images
    for name in ("batch_lost", "worker_crashed", "upload_interrupted"):
        out[name] = 0
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        found = [int(n) for n in resent.findall(text)]
        out["sweeper_resends"] += len(found)
        out["sweeper_resent_images"] += sum(found)
        for name in ("batch_lost", "worker_crashed", "upload_interrupted"):
            out[name] += text.count(name)
        out["errors"][path.stem] = sum(1 for line in text.splitlines() if " ERROR " in line)
        for line in text.splitlines():
            if m := indexed.match(line):
                stamp = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
                out["indexed_at"].append(stamp.timestamp())
    return out
