"""A million vectors on the real Milvus server: build time, memory, latency, recall@10."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

from bench import query
from bench.harness import ROOT, Table, percentile
from shared.vectors import HNSW_BUILD, VectorStore

EFS = (64, 128, 256)


def exact_top10(n: int, dim: int, queries: np.ndarray) -> np.ndarray:
    """Brute-force top-10 row ids over the inserted vectors, rebuilt from their seed."""
    data = np.empty((n, dim), dtype=np.float32)
    for lo, vec in query.clustered(n, dim):
        data[lo : lo + len(vec)] = vec
    scores = data @ queries.T  # (n, q): unit vectors, so cosine
    top = np.argpartition(-scores, 10, axis=0)[:10].T
    order = np.take_along_axis(scores.T, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def milvus_rss_gib(data: Path) -> float:
    """Resident memory of the Milvus server processes started on `data` (all of its roles)."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    kib = sum(
        int(line.split(None, 1)[0])
        for line in out.splitlines()
        if ("milvus" in line and str(data) in line) or " milvus run " in line
    )
    return kib / 2**20


def run(table: Table, *, vectors: int, n_queries: int = 200) -> None:
    """Insert, build HNSW, then measure latency and recall@10 (per ef) against brute force."""
    from tests.integration.test_scale_out import running_milvus_standalone

    data_dir = ROOT / "milvus-scale"
    label = f"standalone-{vectors // 1000}k"
    collection = f"bench_scale_{vectors // 1000}k"  # a quick run never measures a full one
    with running_milvus_standalone(data_dir) as uri:
        # The same path as the 100k figures: insert, settle, wait for the index, then
        # GET /v1/search through the gateway, one client and eight.
        query.run(
            table,
            vectors=vectors,
            index="HNSW",
            seconds=20,
            label=label,
            milvus_uri=uri,
            collection=collection,
        )
        table.add(f"{label}: Milvus resident memory after load", milvus_rss_gib(data_dir), "GiB")
        store = VectorStore(uri=uri, token=None, collection=collection, index="HNSW")
        rng = np.random.default_rng(7)
        centres = np.random.default_rng(0).normal(size=(256, 512)).astype(np.float32)
        # Queries from the same distribution as the data, none of them in it.
        qs = centres[rng.integers(0, 256, n_queries)] + 0.6 * rng.normal(size=(n_queries, 512))
        qs = (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_top10(vectors, 512, qs)
        for ef in EFS:
            latencies, recalls = [], []
            for q, want in zip(qs, truth, strict=True):
                start = time.perf_counter()
                hits = store.client.search(
                    store.collection,
                    data=[q.tolist()],
                    limit=10,
                    search_params={"params": {"ef": ef}},
                    consistency_level="Bounded",
                )[0]
                latencies.append((time.perf_counter() - start) * 1000)
                got = {int(h.id, 16) for h in hits}
                recalls.append(len(got & set(want.tolist())) / 10)
            recall = float(np.mean(recalls))
            p50 = percentile(latencies, 50)
            table.add(
                f"{label}: HNSW {HNSW_BUILD} ef={ef}: Milvus search p50 (p99 "
                f"{percentile(latencies, 99):.1f} ms)",
                p50,
                "ms",
                target="<= 20 ms",
                ok=p50 <= 20,
            )
            table.add(
                f"{label}: ef={ef}: recall@10 vs exact, {n_queries} queries",
                recall,
                "",
                target=">= 0.98",
                ok=recall >= 0.98,
            )
