"""The clipsearch CLI against the real stack: ingest, skip on re-run, search, grid, errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from services.cli import grid
from services.cli.client import Gateway, resolve_url
from services.cli.files import Source
from services.cli.ingest import chunks, parse_metadata
from services.cli.main import main
from services.stack import Stack
from tests.conftest import free_port
from tests.images import encode, make_image, write_set


def run(*args: str) -> tuple[int, str, str]:
    """main(args) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/: 3 images, a nested sub/deeper/ with 2, a zip of 2, a copy, two broken files."""
    root = tmp_path_factory.mktemp("cli") / "photos"
    write_set(root, 3, start=8100)  # img8100.png, img8101.jpg, img8102.jpg
    write_set(root / "sub" / "deeper", 2, start=8103)
    with zipfile.ZipFile(root / "set.zip", "w") as zf:
        zf.writestr("a.jpg", encode(make_image(8105)))
        zf.writestr("more/b.png", encode(make_image(8106), "PNG"))
    whole = encode(make_image(8107, size=(300, 200)))
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # fails in the worker
    (root / "fake.png").write_bytes(b"hello")  # refused at upload
    (root / "sub" / "copy.jpg").write_bytes((root / "img8101.jpg").read_bytes())
    (root / "notes.txt").write_text("not collected: not an image extension")
    (root / ".hidden.jpg").write_bytes(encode(make_image(8108)))  # hidden: not collected
    return root


@pytest.fixture(scope="module")
def first(stack: Stack, api: httpx.Client, folder: Path) -> Iterator[tuple[int, str, str]]:
    """The first ingest of the folder, three files per request, with a tag and metadata."""
    # Its images are deleted afterwards: later modules share the stack, and some compare
    # search results against exactly the images they indexed themselves.
    yield run(
        "--url",
        stack.gateway_url,
        "ingest",
        str(folder),
        "--batch-files",
        "3",
        "--tag",
        "clitest",
        "--metadata",
        '{"album": "cli"}',
    )
    hits = api.get("/v1/search", params={"q": "x", "k": 200, "tag": "clitest"}).json()["hits"]
    for hit in hits:
        api.delete(f"/v1/images/{hit['image_id']}")


def test_ingest_reports_indexed_duplicates_and_failures(
    first: tuple[int, str, str], api: httpx.Client
) -> None:
    code, out, err = first
    assert code == 1, (out, err)
    assert "indexed:     7" in out  # 3 + 2 nested + 2 from the zip
    assert "duplicates:  1" in out  # sub/copy.jpg has img8101.jpg's bytes
    assert "failed:      2" in out
    assert "photos/cut.jpg: decode_failed:" in out
    assert "photos/fake.png: not_an_image:" in out
    assert "rejected at upload: 1" in out
    assert "skipped (already indexed): 0" in out
    assert "jobs:        3" in out  # 8 files sent, 3 per request
    assert "Traceback" not in out + err
    hits = api.get("/v1/search", params={"q": "x", "k": 50, "tag": "clitest"}).json()["hits"]
    assert {h["filename"] for h in hits} == {
        "photos/img8100.png",
        "photos/img8101.jpg",
        "photos/img8102.jpg",
        "photos/sub/deeper/img8103.jpg",
        "photos/sub/deeper/img8104.png",
        "photos/set.zip/a.jpg",
        "photos/set.zip/more/b.png",
    }
    assert all(h["metadata"] == {"album": "cli", "tags": ["clitest"]} for h in hits)


def test_second_ingest_skips_what_is_indexed(
    first: tuple[int, str, str], stack: Stack, folder: Path
) -> None:
    code, out, err = run("--url", stack.gateway_url, "ingest", str(folder), "--json")
    summary = json.loads(out)
    assert summary["skipped"] == 7  # 5 images, the zip (all entries indexed), the copy
    # Only the two files that failed are tried again, and fail again.
    assert (summary["uploaded"], summary["indexed"], summary["failed"]) == (2, 0, 2)
    assert code == 1
    assert "skipped 7 file(s) already indexed" in err

    code, out, err = run("--url", stack.gateway_url, "ingest", str(folder / "sub"), "--json")
    summary = json.loads(out)
    assert code == 0, err
    assert (summary["skipped"], summary["uploaded"], summary["jobs"]) == (3, 0, {})
    assert "skipped 3 file(s) already indexed" in err and "nothing to upload" in err


def test_jobs_and_job(first: tuple[int, str, str], stack: Stack) -> None:
    code, out, _ = run("--url", stack.gateway_url, "jobs", "--json")
    assert code == 0
    recent = json.loads(out)
    job_id = recent[0]["job_id"]
    code, out, _ = run("--url", stack.gateway_url, "jobs")
    assert code == 0 and out.splitlines()[0].startswith("JOB ID") and job_id in out
    code, out, _ = run("--url", stack.gateway_url, "job", job_id)
    assert code == 0 and f"job       {job_id}" in out and "state" in out
    code, out, _ = run("--url", stack.gateway_url, "job", job_id, "--json")
    assert json.loads(out)["job_id"] == job_id
    code, out, err = run("--url", stack.gateway_url, "job", "f" * 32)
    assert code == 2 and out == ""
    assert err == f"clipsearch: no job '{'f' * 32}' (job_not_found)\n"


def test_search_json_returns_k_hits(first: tuple[int, str, str], stack: Stack) -> None:
    code, out, _ = run("--url", stack.gateway_url, "search", "a red car", "-k", "5", "--json")
    assert code == 0
    body = json.loads(out)
    assert body["query"] == "a red car" and len(body["hits"]) == 5
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    code, out, _ = run("--url", stack.gateway_url, "search", "a red car", "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[1].split() == ["#", "SCORE", "FILENAME", "URL"]
    assert len(lines) == 5 and lines[2].split()[0] == "1"
    assert f"{stack.gateway_url}/v1/images/" in lines[2]


def test_search_grid_writes_png(first: tuple[int, str, str], stack: Stack, tmp_path: Path) -> None:
    out_png = tmp_path / "grid.png"
    code, _, err = run(
        "--url", stack.gateway_url, "search", "a dog", "--tag", "clitest", "--grid", str(out_png)
    )
    assert code == 0, err
    with Image.open(out_png) as image:
        assert image.format == "PNG"
        assert image.width == 5 * 150
        # 7 tagged images: two rows of 150 px cells with captions, under a title.
        caption = grid.CAPTION_LINES * grid.LINE + 2 * grid.PAD
        assert image.height == grid.TITLE_HEIGHT + 2 * (150 + caption)


def test_make_grid_layout() -> None:
    cells = [(encode(make_image(i)), f"0.{i:03d}\nname{i}.jpg") for i in range(10)]
    cells.append((b"not an image", "placeholder"))
    image = grid.make_grid("a query", cells, columns=5, cell=150)
    caption = grid.CAPTION_LINES * grid.LINE + 2 * grid.PAD
    assert image.size == (750, grid.TITLE_HEIGHT + 3 * (150 + caption))
    assert grid.make_grid("empty", []).size == (750, grid.TITLE_HEIGHT + 150 + caption)


def test_search_by_image_finds_itself_first(
    first: tuple[int, str, str], stack: Stack, folder: Path
) -> None:
    path = folder / "img8102.jpg"
    code, out, err = run(
        "--url", stack.gateway_url, "search", "--image", str(path), "-k", "3", "--json"
    )
    assert code == 0, err
    hit = json.loads(out)["hits"][0]
    assert hit["image_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hit["score"] > 0.999


def test_unreachable_gateway_is_one_line_and_exit_2(folder: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--url", url, "search", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"clipsearch: cannot reach the gateway at {url}: connection refused\n"
    code, out, err = run("--url", url, "ingest", str(folder))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"clipsearch: cannot reach the gateway at {url}: connection refused"
    ]


def test_usage_errors_exit_2() -> None:
    assert run("ingest", "/no/such/place")[0] == 2
    assert run("search")[0] == 2
    code, _, err = run("ingest", ".", "--metadata", "[1]", "--url", "http://127.0.0.1:1")
    assert (
        code == 2
        and err == 'clipsearch: --metadata must be a JSON object, e.g. \'{"album": "2024"}\'\n'
    )


def test_url_key_metadata_and_chunking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLIPSEARCH_URL", raising=False)
    monkeypatch.setenv("GATEWAY_URL", "http://gw:9000/")
    assert resolve_url(None) == "http://gw:9000"
    monkeypatch.setenv("CLIPSEARCH_URL", "http://cli:1")
    assert resolve_url(None) == "http://cli:1" and resolve_url("http://flag:2") == "http://flag:2"
    with Gateway(url="http://x", api_key="sekret") as gateway:
        assert gateway.http.headers["authorization"] == "Bearer sekret"
    meta = parse_metadata(raw='{"tags": ["a"], "album": "x"}', tags=["b", "a"])
    assert meta == {"tags": ["a", "b"], "album": "x"}
    sizes = [10, 10, 10, 100, 1, 1]
    sources = [Source(tmp_path / f"{i}", f"{i}", size, False) for i, size in enumerate(sizes)]
    groups = [[s.size for s in g] for g in chunks(sources, max_files=2, max_bytes=50)]
    assert groups == [[10, 10], [10], [100], [1, 1]]
