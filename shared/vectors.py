"""The Milvus collection: schema, index, upsert, filtered search, delete."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException, mkts_from_unixtime

from shared.errors import Unavailable

OUTPUT_FIELDS = ["filename", "job_id", "created_at", "width", "height", "metadata"]
# The filename column's VarChar limit, in UTF-8 bytes. A longer value fails the whole upsert
# (every row of the batch), so `fit_row` cuts names to it.
FILENAME_MAX_BYTES = 1024
ELLIPSIS = "\u2026"
# HNSW parameters that keep recall@10 near exact search at library sizes (see BENCHMARKS.md).
HNSW_BUILD = {"M": 16, "efConstruction": 200}
HNSW_SEARCH_EF = 128
CALL_TIMEOUT_S = 10.0
# A filter that keeps at most this many rows is answered exactly, by brute force over those
# rows: an HNSW search under a selective filter walks a graph whose neighbours are mostly
# filtered out and returns too few hits (on Milvus Lite, some of a job's 8 images went missing).
EXACT_FILTERED_ROWS = 4096
# Session searches ask for a view this much newer than the last recorded write, for clocks
# that differ a little between the writer's host and Milvus's.
CLOCK_SKEW_S = 0.05
# pymilvus pings every 10 s even when idle; gRPC servers with default enforcement (Milvus
# Lite's) answer that with GOAWAY "too_many_pings" and the next call fails. Ping only
# during calls, no more often than the default server policy allows.
# After an outage gRPC backs off reconnecting for up to two minutes and fails every call
# meanwhile; cap that so service resumes within seconds of Milvus coming back.
GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 300_000,
    "grpc.keepalive_permit_without_calls": False,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
P = ParamSpec("P")
R = TypeVar("R")


def literal(value: str) -> str:
    """A Milvus string literal for `value`: quoted, with the lexer's escapes applied.

    Milvus Lite ignores expression templates (filter_params), so values are escaped here;
    the lexer knows only these escapes, so nothing else needs (or may have) one.
    """
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def fit_utf8(text: str, limit: int) -> str:
    """`text` within `limit` UTF-8 bytes, cut at a character boundary.

    An over-long name keeps its end (the file's own name, in an archive path) behind an
    ellipsis: "\u2026/deep/dir/photo.jpg".
    """
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    room = limit - len(ELLIPSIS.encode())
    # Dropping the invalid bytes at the front of the cut leaves whole characters only.
    return ELLIPSIS + data[len(data) - room :].decode("utf-8", "ignore")


def fit_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose VarChar values fit their columns (a long archive path would fail its batch)."""
    name = row.get("filename")
    if isinstance(name, str):
        fitted = fit_utf8(name, FILENAME_MAX_BYTES)
        if fitted is not name:
            return {**row, "filename": fitted}
    return row


def _released(exc: MilvusException) -> bool:
    return "released" in str(exc) or "not loaded" in str(exc).lower()


def _unavailable(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn Milvus connection and timeout failures into one Unavailable error."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, VectorStore)
        try:
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                if not _released(exc):
                    raise
                # After a Milvus restart collections come back unloaded: load, try once more.
                store.client.load_collection(store.collection, timeout=CALL_TIMEOUT_S)
                return fn(*args, **kwargs)
        except (MilvusException, grpc.RpcError) as exc:
            store.reset()
            raise Unavailable(f"Milvus is unavailable: {exc}", code="milvus_unavailable") from exc

    return call


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """Typed search filters; every value is escaped as a literal, never pasted raw."""

    job_id: str | None = None
    tag: str | None = None
    filename: str | None = None

    def expression(self) -> str:
        """The boolean expression, every value an escaped literal."""
        parts = []
        if self.job_id:
            parts.append(f"job_id == {literal(self.job_id)}")
        if self.tag:
            parts.append(f'json_contains(metadata["tags"], {literal(self.tag)})')
        if self.filename:
            parts.append(f"filename == {literal(self.filename)}")
        return " and ".join(parts)


class VectorStore:
    """One Milvus collection keyed by image_id (SHA-256 hex), COSINE on normalised vectors."""

    def __init__(
        self,
        *,
        uri: str,
        token: str | None,
        collection: str,
        index: str = "FLAT",
        consistency: str = "Session",
    ) -> None:
        self.uri, self.token, self.collection, self.index = uri, token, collection, index
        self.consistency = consistency
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._ready_dim: int | None = None

    @property
    def client(self) -> MilvusClient:
        """A connected client, created on first use (so a down Milvus does not break imports)."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = MilvusClient(
                        uri=self.uri,
                        token=self.token or "",
                        timeout=CALL_TIMEOUT_S,
                        grpc_options=GRPC_OPTIONS,
                        dedicated=True,  # a reset gets a fresh channel, not a shared broken one
                    )
                except MilvusException as exc:
                    raise Unavailable(
                        f"Milvus at {self.uri} is not reachable: {exc}", code="milvus_unavailable"
                    ) from exc
            return self._client

    def reset(self) -> None:
        """Drop the client so the next call reconnects (after an outage)."""
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):  # a broken client may fail to close
                    self._client.close()
            self._client = None
            self._ready_dim = None

    @_unavailable
    def ping(self) -> bool:
        """Whether Milvus answers."""
        self.client.list_collections(timeout=CALL_TIMEOUT_S)
        return True

    def probe(self) -> None:
        """Raise unless Milvus answers; after a failure the next call reconnects."""
        try:
            self.ping()
        except Exception:
            self.reset()
            raise

    @_unavailable
    def exists(self) -> bool:
        """Whether the collection has been created."""
        return bool(self.client.has_collection(self.collection, timeout=CALL_TIMEOUT_S))

    @_unavailable
    def ensure_collection(self, *, dim: int) -> None:
        """Create the collection with the contract's schema and index if it is missing."""
        if self._ready_dim == dim:
            return
        client = self.client
        if not client.has_collection(self.collection):
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("image_id", DataType.VARCHAR, max_length=64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("filename", DataType.VARCHAR, max_length=FILENAME_MAX_BYTES)
            schema.add_field("job_id", DataType.VARCHAR, max_length=64)
            schema.add_field("created_at", DataType.INT64)
            schema.add_field("width", DataType.INT32)
            schema.add_field("height", DataType.INT32)
            schema.add_field("metadata", DataType.JSON)
            index = client.prepare_index_params()
            params = HNSW_BUILD if self.index == "HNSW" else {}
            if self.index == "IVF_FLAT":
                params = {"nlist": 1024}
            index.add_index("vector", index_type=self.index, metric_type="COSINE", params=params)
            client.create_collection(self.collection, schema=schema, index_params=index)
        else:
            fields = client.describe_collection(self.collection)["fields"]
            have = next(f for f in fields if f["name"] == "vector")["params"]["dim"]
            if int(have) != dim:
                raise Unavailable(
                    f"collection {self.collection!r} holds {have}-d vectors but the model gives "
                    f"{dim}-d; use another MILVUS_COLLECTION for this model",
                    code="dimension_mismatch",
                )
        client.load_collection(self.collection)
        self._ready_dim = dim

    @_unavailable
    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace rows by image_id."""
        if rows:
            data = [fit_row(row) for row in rows]
            self.client.upsert(self.collection, data=data, timeout=CALL_TIMEOUT_S)

    @_unavailable
    def owners(
        self, image_ids: Sequence[str], *, written_at: float | None = None
    ) -> dict[str, str]:
        """For the ids already indexed, the job that indexed each.

        A row another job wrote a moment ago must count as a duplicate here (Milvus
        standalone reads Bounded by default): Strong, or with Session every write recorded
        before `written_at` (Strong cost ~0.4 s per batch on standalone).
        """
        if not image_ids:
            return {}
        level = (
            self.read_level(written_at)
            if self.consistency == "Session"
            else {"consistency_level": "Strong"}
        )
        rows = self.client.get(
            self.collection,
            ids=list(image_ids),
            output_fields=["job_id"],
            timeout=CALL_TIMEOUT_S,
            **level,
        )
        return {row["image_id"]: row["job_id"] for row in rows}

    def read_level(self, written_at: float | None) -> dict[str, Any]:
        """Consistency arguments for a read that must see every write made before `written_at`.

        Session (the default): a guarantee timestamp just after the last recorded write, so
        Milvus waits only while that write is still in flight; unknown (None) reads Strong.
        """
        if self.consistency != "Session":
            return {"consistency_level": self.consistency}
        if written_at is None:
            return {"consistency_level": "Strong"}
        return {
            "consistency_level": "Customized",
            "guarantee_timestamp": mkts_from_unixtime(written_at + CLOCK_SKEW_S),
        }

    @_unavailable
    def search(
        self,
        vector: np.ndarray,
        *,
        k: int,
        filters: SearchFilters | None = None,
        written_at: float | None = None,
    ) -> list[dict[str, Any]]:
        """The k nearest images by cosine similarity, best first, seeing every write made
        before `written_at` (see `read_level`)."""
        expr = (filters or SearchFilters()).expression()
        level = self.read_level(written_at)
        if expr and self.index != "FLAT":
            counted = self.client.query(
                self.collection,
                filter=expr,
                output_fields=["count(*)"],
                timeout=CALL_TIMEOUT_S,
                **level,
            )
            if int(counted[0]["count(*)"]) <= EXACT_FILTERED_ROWS:
                return self._exact(vector, k=k, expr=expr, level=level)
        search_params: dict[str, Any] = {}
        if self.index == "HNSW":
            search_params["params"] = {"ef": max(HNSW_SEARCH_EF, k)}
        result = self.client.search(
            self.collection,
            data=[vector.astype(np.float32).tolist()],
            limit=k,
            filter=expr,
            output_fields=OUTPUT_FIELDS,
            search_params=search_params,
            timeout=CALL_TIMEOUT_S,
            **level,
        )
        hits = []
        for hit in result[0]:
            entity = dict(hit["entity"])
            hits.append({"image_id": hit.id, "score": float(hit.distance), **entity})
        return hits

    def _exact(
        self, vector: np.ndarray, *, k: int, expr: str, level: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The k best of the rows `expr` keeps, by cosine computed here over all of them."""
        rows = self.client.query(
            self.collection,
            filter=expr,
            output_fields=["image_id", "vector", *OUTPUT_FIELDS],
            limit=EXACT_FILTERED_ROWS,
            timeout=CALL_TIMEOUT_S,
            **level,
        )
        if not rows:
            return []
        matrix = np.asarray([row["vector"] for row in rows], dtype=np.float32)
        query = vector.astype(np.float32)
        norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        scores = (matrix @ query) / np.maximum(norms, 1e-12)
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            {
                "image_id": rows[i]["image_id"],
                "score": float(scores[i]),
                **{name: rows[i].get(name) for name in OUTPUT_FIELDS},
            }
            for i in order
        ]

    @_unavailable
    @_unavailable
    def remove(self, image_ids: Sequence[str]) -> None:
        """Remove the rows of these ids (those that exist)."""
        for start in range(0, len(image_ids), 1000):
            chunk = list(image_ids[start : start + 1000])
            self.client.delete(self.collection, ids=chunk, timeout=CALL_TIMEOUT_S)

    def delete(self, image_id: str) -> int:
        """Remove one image's vector; the number of rows removed."""
        if not self.owners([image_id]):
            return 0
        self.client.delete(self.collection, ids=[image_id], timeout=CALL_TIMEOUT_S)
        return 1

    @_unavailable
    def settle(self) -> None:
        """Seal what was written and merge small segments, after a job's last batch.

        Milvus Lite searches unflushed rows and many small segments by brute force: 100,000
        rows written in batches answered in ~1.2 s a query; flushed, ~130 ms; compacted,
        ~43 ms (measured here). Standalone Milvus compacts by itself; a flush per job is cheap.
        """
        self.client.flush(self.collection, timeout=120)
        with contextlib.suppress(MilvusException):  # not every deployment allows manual runs
            self.client.compact(self.collection, timeout=120)

    @_unavailable
    def ids(self, *, batch: int = 4096) -> set[str]:
        """Every image id in the collection (a strong read, page by page)."""
        out: set[str] = set()
        if not self.exists():
            return out
        it = self.client.query_iterator(
            self.collection,
            batch_size=batch,
            filter="",
            output_fields=["image_id"],
            consistency_level="Strong",
            timeout=CALL_TIMEOUT_S,
        )
        try:
            while rows := it.next():
                out.update(row["image_id"] for row in rows)
        finally:
            it.close()
        return out

    @_unavailable
    def count(self) -> int:
        """Rows in the collection (exact, after a strong read)."""
        rows = self.client.query(
            self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])
