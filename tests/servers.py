"""Real servers for the remote-tracking, UI and fan-out tests: PostgreSQL, `mlflow server`, Chromium.

Each one is a real process on 127.0.0.1 with a private port and folder. A missing system tool skips
the tests that need it locally, but fails them under CI (env CI=true): `.ci/run` installs it there.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import bin_path, free_port, stop_process, wait_http

CHROMIUM = "/usr/bin/chromium"
# Flags that keep a headless Chromium quiet and offline inside a container running as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PG_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"
PG_START_TIMEOUT_S = 60
# MLflow 3.17's server starts six job-runner processes (GenAI judges, scheduled tasks) of ~240 MB
# each; nothing here uses them, and on 2 shared cores they slow every test down.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def require_tool(available: bool, what: str) -> None:
    """Skip with a reason locally; fail under CI, where a missing tool means a broken set-up."""
    if available:
        return
    reason = f"{what} is not installed (.ci/run installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + "; refusing to skip under CI")
    pytest.skip(reason)


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries folder, or None."""
    dirs = sorted(glob.glob(PG_GLOB), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


@dataclass
class Postgres:
    """A private PostgreSQL cluster: its data folder, port and binaries."""

    data_dir: Path
    port: int
    bin_dir: Path

    def sqlalchemy_uri(self, db: str) -> str:
        # A bare postgresql:// makes SQLAlchemy 2.1 look for psycopg 3, which is not installed.
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{db}"


def _as_pg_user(args: list[str], timeout: float = PG_START_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the postgres user when we are root (the server refuses to run as root)."""
    if os.geteuid() == 0:
        cmd = ["su", PG_USER, "-s", "/bin/sh", "-c", shlex.join(args)]
    else:
        cmd = args
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    return result


def start_postgres() -> Postgres:
    """initdb a fresh cluster in /tmp (which postgres can traverse) and start it on a free port."""
    bin_dir = postgres_bin()
    data_dir = Path(tempfile.mkdtemp(prefix="slmops-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, PG_USER, PG_USER)
    port = free_port()
    _as_pg_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", PG_USER])
    opts = f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1"
    _as_pg_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", opts, "-l", str(data_dir / "server.log"),
                 "-w", "-t", str(PG_START_TIMEOUT_S), "start"])
    return Postgres(data_dir, port, bin_dir)


def create_database(pg: Postgres, name: str) -> str:
    """CREATE DATABASE name; returns its SQLAlchemy URI for `mlflow server --backend-store-uri`."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=PG_USER, dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return pg.sqlalchemy_uri(name)


def stop_postgres(pg: Postgres) -> None:
    try:
        _as_pg_user([str(pg.bin_dir / "pg_ctl"), "-D", str(pg.data_dir), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(pg.data_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    """A running `mlflow server` subprocess serving artifacts over HTTP."""

    url: str
    backend_uri: str
    artifacts_dir: Path
    proc: subprocess.Popen
    log_path: Path


def start_mlflow_server(backend_uri: str, root: Path) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with --serve-artifacts, so clients fetch artifacts over HTTP only."""
    port = free_port()
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    # A log file, not a pipe: nobody reads a pipe while tests run, and the access log would fill it and
    # block the server after a few hundred requests.
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
             "--serve-artifacts", "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            env={**os.environ, **SERVER_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc)
    except Exception as exc:
        stop_process(proc)
        raise RuntimeError(f"mlflow server did not start: {exc}\n{log_path.read_text()[-3000:]}") from exc
    return MlflowServer(url, backend_uri, artifacts, proc, log_path)
