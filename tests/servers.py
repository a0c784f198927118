"""Servers the multi-machine tests start on loopback and stop by process id: an MLflow tracking server and a
throw-away PostgreSQL cluster (``initdb`` in a temporary directory, unix socket and 127.0.0.1 only)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group the server leads, then SIGKILL it if it does not exit."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_uri: str, workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with ``backend_uri`` and proxied artifacts under ``workdir/art``; yields
    its URI and stops it (its process group, by pid) on exit."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(Path(workdir) / "mlflow-server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               backend_uri, "--artifacts-destination", str(Path(workdir) / "art"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(Path(workdir) / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start in 120 s")
        yield uri
    finally:
        _stop(server)
        log.close()


def postgres_binaries() -> Optional[Path]:
    """The directory holding the server binaries ``initdb`` and ``postgres`` (PATH, then Debian's
    /usr/lib/postgresql/*/bin)."""
    found = shutil.which("initdb")
    if found and (Path(found).parent / "postgres").is_file():
        return Path(found).parent
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


@contextlib.contextmanager
def postgres_cluster(workdir: Path) -> Iterator[str]:
    """A throw-away PostgreSQL cluster: ``initdb`` in ``workdir/pg``, listening on 127.0.0.1 and a unix socket
    in ``workdir`` only; yields a SQLAlchemy URI of database ``mlflow`` and stops the server by its pid."""
    bindir = postgres_binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not found")
    env = dict(os.environ, LC_ALL="C")
    user_args = []
    if os.geteuid() == 0:
        # initdb refuses root: the cluster runs as an unprivileged user, in a directory it can reach (pytest's
        # tmp_path is private to root), removed on exit
        user_args = ["runuser", "-u", "nobody", "--"]
        own = Path(tempfile.mkdtemp(prefix="fsl-pg-"))
        os.chmod(own, 0o777)
        workdir = own
    else:
        own = None
    data, sock = Path(workdir) / "pg", Path(workdir) / "pgsock"
    sock.mkdir(parents=True, exist_ok=True)
    if own is not None:
        os.chmod(sock, 0o777)
    try:
        subprocess.run(user_args + [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                                    "--no-sync"], check=True, capture_output=True, env=env, timeout=120)
    except subprocess.CalledProcessError as exc:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from None
    port = free_port()
    server = subprocess.Popen(user_args + [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k",
                                           str(sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    try:
        import psycopg2  # MLflow's PostgreSQL driver; readiness = a connection succeeds

        for _ in range(240):
            if server.poll() is not None:
                raise RuntimeError("postgres exited at start")
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres",
                                 connect_timeout=2).close()
                break
            except psycopg2.OperationalError:
                time.sleep(0.5)
        else:
            raise RuntimeError("postgres did not accept connections in 120 s")
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop(server)
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
