"""`make demo`: a working search on embedded defaults, in one command, online or offline.

With the Hugging Face hub reachable: openai/clip-vit-base-patch32 and the Milvus tutorial's
1,000 ImageNet JPEGs, queried with "a white dog". Offline (CLIP_MODEL unset and no hub): a
small CLIP that this project trains itself on Fashion-MNIST (Debian's dataset-fashion-mnist),
cached under DATA_DIR, and 50 test images of each of its 10 classes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.cli.main import main as cli
from services.stack import Stack, is_ready
from shared.settings import Settings

TUTORIAL_ZIP = (
    "https://github.com/towhee-io/examples/releases/download/data/reverse_image_search.zip"
)
HUB_MODEL = "openai/clip-vit-base-patch32"


@dataclass
class Sample:
    """What the demo indexes and asks."""

    model: str
    images: Path
    queries: list[str]
    labelled: bool  # images live in one folder per class: precision@10 can be shown


def hub_reachable() -> bool:
    """Whether huggingface.co answers (HF_HUB_OFFLINE=1 says no without asking)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        return httpx.head("https://huggingface.co", timeout=3).status_code < 500
    except httpx.HTTPError:
        return False


def tutorial_sample(data: Path, model: str) -> Sample:
    """The Milvus tutorial's images (downloaded once) and its query."""
    folder = data / "demo" / "reverse_image_search"
    if not (folder / "train").exists():
        archive = data / "demo" / "reverse_image_search.zip"
        archive.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading the tutorial's images from {TUTORIAL_ZIP}")
        with httpx.stream("GET", TUTORIAL_ZIP, follow_redirects=True, timeout=120) as response:
            response.raise_for_status()
            with archive.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)
    train = next(folder.rglob("train"))
    queries = ["a white dog", "a red car", "a bird on a branch", "a plate of food"]
    return Sample(model=model, images=train, queries=queries, labelled=False)


def fashion_sample(data: Path) -> Sample:
    """The offline sample: the project's own Fashion-MNIST CLIP and 500 test images."""
    from services.demo.fashion import CLASS_PROMPTS, write_images
    from services.demo.train import DEFAULT_STEPS, ensure_demo_model

    cache = data / "cache"
    model_dir = data / "models" / "fashion-clip"
    if not (model_dir / "model.safetensors").exists():
        print(
            f"training the demo's CLIP on Fashion-MNIST ({DEFAULT_STEPS} steps, a few "
            "minutes on 2 cores; cached afterwards) ...",
            flush=True,
        )
    model = ensure_demo_model(model_dir, cache_dir=cache, progress=lambda line: print(line))
    images = data / "demo" / "fashion"
    write_images(images, cache_dir=cache, per_class=50)
    return Sample(
        model=str(model), images=images, queries=list(CLASS_PROMPTS.values()), labelled=True
    )


def choose(settings: Settings, data: Path) -> Sample:
    """CLIP_MODEL if set (with the offline image set unless the hub is reachable)."""
    given = os.environ.get("CLIP_MODEL")
    online = hub_reachable()
    if online:
        return tutorial_sample(data, given or HUB_MODEL)
    sample = fashion_sample(data)
    if given:
        sample.model = given
    return sample


def precision(body_hits: list[dict[str, object]], query: str) -> float | None:
    """Share of hits whose class folder is the one the query names (Fashion-MNIST)."""
    from services.demo.fashion import CLASS_PROMPTS, CLASS_SLUGS

    wanted = next((CLASS_SLUGS[c] for c, q in CLASS_PROMPTS.items() if q == query), None)
    if wanted is None or not body_hits:
        return None
    good = sum(str(h.get("filename", "")).split("/")[-2:-1] == [wanted] for h in body_hits)
    return good / len(body_hits)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    data = settings.data_dir.resolve()
    sample = choose(settings, data)
    os.environ["CLIP_MODEL"] = sample.model
    stack = Stack(Settings())
    if is_ready(f"{stack.gateway_url}/readyz"):
        print(f"a stack already answers at {stack.gateway_url}; using it (make down to restart)")
    else:
        print(f"starting the stack with CLIP_MODEL={sample.model} ...", flush=True)
        stack.up(timeout_s=900)
    url = stack.gateway_url
    print(f"\ningesting {sample.images} through {url}/v1/jobs", flush=True)
    started = time.perf_counter()
    rc = cli(["--url", url, "ingest", str(sample.images), "--tag", "demo"])
    if rc == 2:
        return rc
    print(f"ingested in {time.perf_counter() - started:.1f}s\n")
    grids = data / "demo" / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=url, timeout=60) as client:
        for query in sample.queries:
            out = grids / (re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-") + ".png")
            cli(["--url", url, "search", query, "-k", "10", "--grid", str(out)])
            hits = client.get("/v1/search", params={"q": query, "k": 10}).json().get("hits", [])
            share = precision(hits, query) if sample.labelled else None
            note = f"  precision@10 {share:.1f}" if share is not None else ""
            print(f"  grid: {out}{note}\n", flush=True)
    print(f"web page:  {url}/\nAPI docs:  {url}/docs\nresult grids: {grids}")
    print("the stack keeps running; stop it with: make down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
