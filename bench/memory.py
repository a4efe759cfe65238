"""Resident memory of a process holding the model: both towers (query service) against the
image tower only (a worker), ViT-B/32 shape, each in a fresh Python process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.fixtures import vit_b32
from bench.harness import ROOT, Table

# Run in a child: load, warm up, then report the peak and the resident set after loading.
_CHILD = """
import gc, json, resource, sys
from shared.ml.encoder import BOTH, IMAGE_ONLY, ClipEncoder

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

towers = IMAGE_ONLY if sys.argv[2] == "image" else BOTH
before = rss()
encoder = ClipEncoder(model=sys.argv[1], device="cpu", dtype=sys.argv[3], towers=towers)
encoder.warmup()
gc.collect()
print(json.dumps({"before": before, "after": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: Path, towers: str, dtype: str) -> dict[str, float]:
    """MiB resident: before loading, after loading and warming up, and the peak."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), towers, dtype],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def run(table: Table) -> None:
    """Add each dtype's resident memory with both towers and with the image tower only."""
    model = vit_b32(ROOT / "models" / "vit-b32")
    for dtype in ("float32", "bfloat16"):
        both = measure(model, "both", dtype)
        image = measure(model, "image", dtype)
        model_both = both["after"] - both["before"]
        model_image = image["after"] - image["before"]
        table.add(f"resident after load, both towers, {dtype}", model_both, "MiB")
        table.add(
            f"resident after load, image tower only (worker), {dtype}",
            model_image,
            "MiB",
            baseline=model_both,
            baseline_name="both towers",
        )
        table.add(f"peak while loading, image tower only, {dtype}", image["peak"], "MiB")
        table.add(f"peak while loading, both towers, {dtype}", both["peak"], "MiB")
