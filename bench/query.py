"""Query latency through the gateway with many images indexed, one client and eight."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.fixtures import vit_b32
from bench.harness import ROOT, Table, percentile, private_stack
from shared.vectors import VectorStore

WORDS = [
    "dog",
    "cat",
    "car",
    "tree",
    "beach",
    "city",
    "night",
    "red",
    "white",
    "small",
    "old",
    "boat",
    "house",
    "bird",
    "flower",
    "mountain",
    "person",
    "street",
    "snow",
    "river",
    "bridge",
    "table",
    "chair",
    "book",
    "phone",
]


def clustered(
    n: int, dim: int, *, batch: int = 5_000, start: int = 0, seed: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Unit vectors around 256 centres, like real embeddings, batch by batch: (first, rows).

    The same arguments give the same vectors, so a recall check can rebuild what was inserted.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32)
    for lo in range(0, start + n, batch):
        size = min(batch, start + n - lo)
        vec = centres[rng.integers(0, 256, size)] + 0.6 * rng.normal(size=(size, dim))
        vec = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
        if lo + size > start:  # an overlap with what is there is upserted again, harmlessly
            yield lo, vec


def fill(store: VectorStore, *, n: int, dim: int, start: int = 0) -> float:
    """Insert n clustered unit vectors directly (ids from `start`); seconds taken."""
    began = time.perf_counter()
    for lo, vec in clustered(n, dim, start=start):
        store.upsert(
            [
                {
                    "image_id": f"{lo + i:064x}",
                    "vector": v.tolist(),
                    "filename": "x",
                    "job_id": "bench",
                    "created_at": 0,
                    "width": 1,
                    "height": 1,
                    "metadata": {},
                }
                for i, v in enumerate(vec)
            ]
        )
    return time.perf_counter() - began


def wait_indexed(store: VectorStore, rows: int, *, timeout_s: float = 1800) -> float:
    """Seconds until Milvus reports every row indexed: searches are measured on the index
    as a library that has settled, not while its build still takes the CPU."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        info = store.client.describe_index(store.collection, "vector")
        if int(info.get("indexed_rows", 0)) >= rows and not int(info.get("pending_index_rows", 0)):
            return time.perf_counter() - start
        time.sleep(1)
    raise TimeoutError(f"index not built in {timeout_s:.0f} s: {info}")


def settle_fully(store: VectorStore, rows: int) -> float:
    """Seconds to run a compaction to its end, index what it made, and go idle."""
    start = time.perf_counter()
    try:
        job = store.client.compact(store.collection)
        while store.client.get_compaction_state(job) != "Completed":
            time.sleep(1)
    except Exception as exc:  # Milvus Lite compacts by itself and has no job to follow
        print(f"(no compaction job to follow: {exc.__class__.__name__})")
    wait_indexed(store, rows)
    wait_idle(window_s=5.0)
    return time.perf_counter() - start


def _cpu_times() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # all, idle + iowait


def wait_idle(*, busy_below: float = 0.15, window_s: float = 3.0, timeout_s: float = 1800) -> float:
    """Seconds until the whole machine was at least 85 % idle over a few seconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        total0, idle0 = _cpu_times()
        time.sleep(window_s)
        total1, idle1 = _cpu_times()
        if 1 - (idle1 - idle0) / max(total1 - total0, 1e-9) < busy_below:
            return time.perf_counter() - start
    raise TimeoutError("the machine did not go idle")


def queries(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) + f" {i}" for i in range(n)]


def warm_up(url: str, *, seconds: float = 10.0) -> None:
    """Search for a while before measuring. A few seconds into the first searches after a
    quiet spell, Milvus standalone burns more than a core for 1-2 s (sampled from /proc:
    110-130 % against ~50 %, same segments before and after); searches meanwhile took
    40-110 ms. Measured after it, the figures describe a server in use."""
    start, i = time.perf_counter(), 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.perf_counter() - start < seconds:
            client.get("/v1/search", params={"q": f"warming up {i}", "k": 10})
            i += 1


def latencies(url: str, texts: list[str]) -> tuple[list[float], int]:
    out, errors = [], 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for text in texts:
            start = time.perf_counter()
            response = client.get("/v1/search", params={"q": text, "k": 10})
            out.append((time.perf_counter() - start) * 1000)
            errors += response.status_code >= 400
    return out, errors


def run(
    table: Table,
    *,
    vectors: int,
    index: str,
    seconds: float,
    label: str,
    milvus_uri: str | None = None,
    collection: str | None = None,
) -> None:
    """p50/p99 for one client and QPS for eight, distinct query texts (no cache hits)."""
    model = vit_b32(ROOT / "models" / "vit-b32-random")
    env = {"CLIP_MODEL": str(model), "CLIP_DEVICE": "cpu", "MILVUS_INDEX": index}
    if milvus_uri:
        env["MILVUS_URI"] = milvus_uri
    if collection:
        env["MILVUS_COLLECTION"] = collection
    # Reuses its vectors: one stack per size, so a quick run never measures a full one.
    with private_stack(f"query-{label}-{vectors // 1000}k", env, fresh=False) as stack:
        store = VectorStore(
            uri=stack.settings.milvus_uri,
            token=None,
            collection=stack.settings.milvus_collection,
            index=index,
        )
        store.ensure_collection(dim=512)
        have = store.count()
        took = fill(store, n=vectors - have, dim=512, start=have) if have < vectors else 0.0
        if took:
            start = time.perf_counter()
            store.settle()  # as the worker does when a job ends
            took += time.perf_counter() - start
        if took:
            table.add(
                f"{label}: insert {vectors - have} vectors", (vectors - have) / took, "vectors/s"
            )
        built = wait_indexed(store, vectors)
        table.add(f"{label}: index built {vectors} vectors, after the inserts", built, "s")
        # Compaction merges segments and re-indexes them after describe_index first says
        # done: measure a library that has settled, once the machine is idle again.
        settled = settle_fully(store, vectors)
        table.add(f"{label}: then compacted, re-indexed and idle", settled, "s")
        warm_up(stack.gateway_url)
        one, errors = latencies(stack.gateway_url, queries(300, 1))
        table.add(
            f"{label}: 1 client p50, {vectors} images, {index}",
            percentile(one, 50),
            "ms",
            target="<= 15 ms",
            ok=percentile(one, 50) <= 15,
        )
        table.add(
            f"{label}: 1 client p99",
            percentile(one, 99),
            "ms",
            target="<= 50 ms",
            ok=percentile(one, 99) <= 50,
        )
        per_client = max(20, int(seconds * 15))
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(
                    lambda s: latencies(stack.gateway_url, queries(per_client, s)), range(100, 108)
                )
            )
        elapsed = time.perf_counter() - start
        total = sum(len(r[0]) for r in results)
        errors += sum(r[1] for r in results)
        qps = total / elapsed
        table.add(
            f"{label}: 8 clients, {total} queries, {errors} errors",
            qps,
            "QPS",
            target=">= 100 QPS, 0 errors",
            ok=qps >= 100 and errors == 0,
        )
        for stage, mean in stage_means(f"http://127.0.0.1:{stack.settings.query_port}").items():
            table.add(f"{label}: where a query's time went, mean {stage} stage", mean, "ms")


def stage_means(query_url: str) -> dict[str, float]:
    """Mean milliseconds per stage (encode, search) from the query service's own metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx.get(f"{query_url}/metrics").text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            if line.startswith(f"clipsearch_search_stage_seconds{suffix}{{"):
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {k: 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}
