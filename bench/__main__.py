"""`make bench`: the speed figures beside their baselines, measured in one run.

python -m bench                 # quick sizes (a few minutes)
python -m bench --full          # the issue's sizes: 1,000 JPEGs, 10,000-image ceiling,
                                # 100,000 vectors for queries
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from bench import ingest, query
from bench.harness import ROOT, Table


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--full", action="store_true", help="the issue's full sizes")
    parser.add_argument(
        "--only",
        choices=["ingest", "ceiling", "precision", "memory", "query", "standalone", "scale"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the ingest model runs"
    )
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="also measure queries on the real Milvus server (PyPI milvus)",
    )
    args = parser.parse_args()
    parts = set(args.only or ["ingest", "ceiling", "precision", "memory", "query"])
    table = Table()
    full = args.full
    if "ingest" in parts:
        ingest.run(
            table,
            images=int(os.environ.get("BENCH_IMAGES", 1000 if full else 256)),
            dtype=args.dtype,
            tutorial_images=64 if full else 32,
            ceiling=0,
            device=args.device,
            batch=args.batch,
        )
    if "ceiling" in parts:
        ingest.pipeline_ceiling(table, n=10_000 if full else 3_000)
    if "precision" in parts:
        from bench import precision

        precision.run(table)
    if "memory" in parts:
        from bench import memory

        memory.run(table)
    if "query" in parts:
        query.run(
            table,
            vectors=100_000 if full else 20_000,
            index="HNSW",
            seconds=20 if full else 8,
            label="milvus-lite",
        )
    if args.standalone or "standalone" in (args.only or []):
        # The launcher the scale-out test uses: milvus-server from PyPI `milvus==2.3.5`.
        from tests.integration.test_scale_out import running_milvus_standalone

        with running_milvus_standalone(ROOT / "milvus-standalone") as uri:
            query.run(
                table,
                vectors=100_000 if full else 20_000,
                index="HNSW",
                seconds=20 if full else 8,
                label="milvus-standalone",
                milvus_uri=uri,
            )
    if "scale" in (args.only or []):
        from bench import scale

        scale.run(table, vectors=1_000_000 if full else 200_000)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "full": full,
        "dtype": args.dtype,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
    }
    table.save(ROOT / f"results-{'full' if full else 'quick'}.json", meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
