"""Run the whole stack on one machine: `python -m services.stack up|down|status`.

Starts, in the background, a Redis (unless one answers at REDIS_URL), a Milvus Lite server
(unless one answers at MILVUS_URI), the query service, one worker and the gateway; waits until
they are ready; records what it started under DATA_DIR/run so `down` stops exactly that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from shared.errors import Unavailable
from shared.settings import Settings
from shared.vectors import VectorStore


@dataclass
class Stack:
    """The processes of one stack, keyed by name; their pids are kept in DATA_DIR/run."""

    settings: Settings
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    argvs: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.data = s.data_dir.resolve()
        self.run_dir, self.log_dir = self.data / "run", self.data / "logs"
        for d in (self.run_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "DATA_DIR": str(self.data),
            "REDIS_URL": s.redis_url,
            "MILVUS_URI": s.milvus_uri,
            "QUERY_URL": os.environ.get("QUERY_URL", f"http://127.0.0.1:{s.query_port}"),
            **self.env,
        }
        self.gateway_url = f"http://127.0.0.1:{s.gateway_port}"
        self.query_url = self.env["QUERY_URL"]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start one process in its own session, logging to DATA_DIR/logs/NAME.log."""
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name], self.argvs[name] = proc, argv
        (self.run_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def send(self, name: str, sig: signal.Signals, *, group: bool = True) -> None:
        """Send `sig` to one process (or its whole process group)."""
        pid = self.procs[name].pid
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)

    def stop(
        self, name: str, *, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30
    ) -> None:
        """Stop one process and wait for it to exit."""
        proc = self.procs[name]
        _stop(proc.pid, timeout_s, sig=sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        (self.run_dir / f"{name}.pid").unlink(missing_ok=True)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start a stopped process again with the same command line."""
        return self.start(name, self.argvs[name])

    def up(self, *, timeout_s: float = 300.0, workers: int = 1) -> None:
        """Start what is missing and wait until the gateway and query service are ready."""
        s = self.settings
        if not _redis_answers(s.redis_url):
            self.start("redis", _redis_argv(s.redis_url, self.data / "redis"))
            _wait(lambda: _redis_answers(s.redis_url), 30, "redis", self)
        if not _milvus_answers(s.milvus_uri):
            host, port = _local_endpoint(s.milvus_uri, "MILVUS_URI")
            (self.data / "milvus").mkdir(exist_ok=True)
            self.start(
                "milvus",
                [
                    _bin("milvus-lite"),
                    "server",
                    "--data-dir",
                    str(self.data / "milvus"),
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--max-workers",
                    "1",
                ],
            )
            _wait(lambda: _milvus_answers(s.milvus_uri), 60, "milvus", self)
        py = sys.executable
        self.start(
            "query",
            [
                py,
                "-m",
                "uvicorn",
                "services.query.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(s.query_port),
            ],
        )
        for i in range(1, workers + 1):
            self.start_worker(f"worker{i}")
        self.start(
            "gateway",
            [
                py,
                "-m",
                "uvicorn",
                "services.gateway.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(s.gateway_port),
            ],
        )
        _wait(lambda: is_ready(f"{self.query_url}/readyz"), timeout_s, "query", self)
        _wait(lambda: is_ready(f"{self.gateway_url}/readyz"), timeout_s, "gateway", self)

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """One Celery worker process (one pool child) on the embed queue."""
        port = self.settings.gateway_port
        return self.start(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "services.worker.app",
                "worker",
                "-Q",
                "embed",
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
                "-n",
                f"{name}-{port}@%h",
            ],
        )

    def down(self, *, timeout_s: float = 30.0) -> list[str]:
        """Stop every process this stack started (recorded in DATA_DIR/run), gateway first."""
        workers = sorted(p.stem for p in self.run_dir.glob("worker*.pid"))
        order = ["gateway", "query", *workers, "milvus", "redis"]
        stopped = []
        for name in order:
            pidfile = self.run_dir / f"{name}.pid"
            if not pidfile.exists():
                continue
            pid = int(pidfile.read_text())
            if _stop(pid, timeout_s, sig=signal.SIGTERM):
                stopped.append(name)
            pidfile.unlink(missing_ok=True)
        return stopped


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _redis_argv(url: str, data: Path) -> list[str]:
    server = shutil.which("redis-server")
    if not server:
        raise SystemExit(
            "no Redis answers at REDIS_URL and redis-server is not installed "
            "(Debian: apt-get install redis-server)"
        )
    host, port = _local_endpoint(url, "REDIS_URL")
    data.mkdir(parents=True, exist_ok=True)
    return [
        server,
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--daemonize",
        "no",
    ]


def _local_endpoint(url: str, name: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
        raise SystemExit(
            f"nothing answers at {name}={url} and it is not a local address "
            "this command can start a server on"
        )
    return "127.0.0.1", parsed.port


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _milvus_answers(uri: str) -> bool:
    parsed = urlparse(uri)
    if parsed.hostname is None:
        return False
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 19530), timeout=1):
            pass
    except OSError:
        return False
    probe = VectorStore(uri=uri, token=None, collection="-")
    try:
        return probe.ping()
    except Unavailable:
        return False
    finally:
        probe.reset()


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(probe: object, timeout_s: float, what: str, stack: Stack) -> None:
    assert callable(probe)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        proc = stack.procs.get(what)
        if proc is not None and proc.poll() is not None:
            raise SystemExit(
                f"{what} exited with {proc.returncode}; see {stack.log_dir / (what + '.log')}"
            )
        time.sleep(0.3)
    raise SystemExit(f"{what} was not ready after {timeout_s:.0f}s; see {stack.log_dir}")


def _stop(pid: int, timeout_s: float, *, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True


def main(argv: list[str] | None = None) -> int:
    """The `make up` / `make down` entry point."""
    parser = argparse.ArgumentParser(prog="python -m services.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    stack = Stack(Settings())
    if args.command == "up":
        try:
            stack.up(workers=args.workers)
        except SystemExit:
            stack.down()
            raise
        print(
            json.dumps(
                {
                    "gateway": stack.gateway_url,
                    "query": stack.query_url,
                    "logs": str(stack.log_dir),
                },
                indent=2,
            )
        )
        print(f"clipsearch is up: {stack.gateway_url}  (stop it with: make down)")
    elif args.command == "down":
        print("stopped:", ", ".join(stack.down()) or "nothing")
    else:
        running = {p.stem: int(p.read_text()) for p in stack.run_dir.glob("*.pid")}
        print(json.dumps(running, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
