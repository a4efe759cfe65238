"""Peak memory and CPU of a gateway under concurrent hostile uploads (issue 16, item 1).

python -m bench.hostile                      # 3 long-name tars + 3 pax tars + 1 zip bomb at once
python -m bench.hostile --rounds 3 --declared-mib 1536
python -m bench.hostile --source /tmp/old    # the same against another checkout's gateway

Starts its own redis-server and one gateway (uvicorn) on free ports; Milvus is not needed for
uploads. Prints the gateway's resident memory before, its peak (VmHWM, from /proc) after, the
gateway's CPU seconds and each request's status, code and latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.hostile_files import header_bomb, zip_bomb

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile")
    parser.add_argument("--long-name", type=int, default=3, help="long-name tars per round")
    parser.add_argument("--pax", type=int, default=3, help="pax tars per round")
    parser.add_argument("--zip", type=int, default=1, help="zip bombs per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--declared-mib", type=int, default=1536, help="each tar header's size")
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to run")
    args = parser.parse_args()

    uploads = (
        [("x.tar", header_bomb("L", args.declared_mib << 20))] * args.long_name
        + [("x.tar", header_bomb("x", args.declared_mib << 20))] * args.pax
        + [("bomb.zip", zip_bomb())] * args.zip
    )
    sizes = sorted({len(data) for _, data in uploads})
    print(f"{len(uploads)} uploads at once, {sizes} bytes each, {args.rounds} round(s)")
    tmp = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    redis_port, port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(args.source),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MILVUS_URI": f"http://127.0.0.1:{_free_port()}",  # nothing there: not needed
        "DATA_DIR": str(tmp),
        "RATE_LIMIT_UPLOADS": "",
        "LOG_LEVEL": "WARNING",
        "MAX_CONCURRENT_UPLOADS": str(max(4, len(uploads))),
    }
    server = shutil.which("redis-server") or "redis-server"
    redis = subprocess.Popen(
        [server, "--port", str(redis_port), "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.gateway.main:app", "--port", str(port)],
        cwd=args.source,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        before, cpu0 = _status(gateway.pid), _cpu_s(gateway.pid)

        def send(item: tuple[str, bytes]) -> tuple[str, int, str, float]:
            start = time.perf_counter()
            answer = client.post("/v1/jobs", files=[("files", item)])
            body = answer.json()
            code = body.get("code") or ",".join(sorted({r["code"] for r in body["rejected"]}))
            return item[0], answer.status_code, code, time.perf_counter() - start

        start = time.perf_counter()
        client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))
        with client, ThreadPoolExecutor(len(uploads)) as pool:
            for _ in range(args.rounds):
                for name, status, code, took in pool.map(send, uploads):
                    print(f"  {name:9} {status} {code:26} {took:6.2f} s")
        wall = time.perf_counter() - start
        after = _status(gateway.pid)
        cpu = _cpu_s(gateway.pid) - cpu0
        print(
            f"gateway RSS before {before['VmRSS']} MiB, peak {after['VmHWM']} MiB "
            f"(+{after['VmHWM'] - before['VmRSS']} MiB); {cpu:.2f} CPU s; {wall:.2f} s wall"
        )
    finally:
        for proc in (gateway, redis):
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
