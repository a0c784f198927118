"""Servers the multi-machine tests start on loopback and stop by process id: an MLflow tracking server, a
throw-away PostgreSQL cluster (``initdb`` in a temporary directory, unix socket and 127.0.0.1 only) and a
throw-away one-node SLURM cluster (munged, slurmctld and slurmd with everything in a temporary directory)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
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


# ------------------------------------------------------------------------------------------------ SLURM
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "sinfo")


def slurm_program(name: str) -> Optional[Path]:
    """A SLURM or MUNGE program on PATH or in the system's sbin directories (Debian puts the daemons there,
    off a non-root user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return Path(found) if found else None


def slurm_missing() -> Optional[str]:
    """Why a throw-away SLURM cluster cannot start here (None when it can): the programs, and root (slurmd
    starts each job as its user)."""
    lacking = [p for p in SLURM_PROGRAMS if slurm_program(p) is None]
    if lacking:
        return (f"SLURM/MUNGE programs not found: {', '.join(lacking)} (bash tools/install_slurm.sh installs "
                "Debian's slurm-wlm and munge)")
    if os.geteuid() != 0:
        return "a throw-away SLURM cluster needs root (slurmd starts each job as its user)"
    return None


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """A running one-node cluster: clients find it through ``SLURM_CONF=conf``."""

    conf: Path
    workdir: Path
    cpus: int
    mem_mb: int
    partition: str
    max_time_min: int

    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))


def _daemon(args, workdir: Path, name: str, env: dict) -> subprocess.Popen:
    log = open(workdir / f"{name}.out", "w")
    try:
        return subprocess.Popen([str(a) for a in args], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path.name} not written)"


def _cluster_processes(conf: Path):
    """pids of the processes that run with ``SLURM_CONF=conf`` (the cluster's step daemons and jobs), except
    this one."""
    mark = f"SLURM_CONF={conf}".encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in environ:
            out.append(int(proc.name))
    return out


@contextlib.contextmanager
def slurm_cluster(workdir: Path, *, partition: str = "debug", max_time_min: int = 60,
                  kill_wait_s: int = 1) -> Iterator[SlurmCluster]:
    """A throw-away one-node SLURM cluster on loopback: munged (its key, socket and state in ``workdir``),
    slurmctld and slurmd on free ports of 127.0.0.1, with state, spool, pid files and logs in ``workdir``;
    node ``localhost`` with this machine's CPUs and memory, one partition (default, ``MaxTime``
    ``max_time_min``), no cgroups, no accounting. Yields once the node is idle; on exit cancels every job,
    stops the daemons by their process ids and kills job processes left behind."""
    workdir = Path(workdir)
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("SLURM_CONF", None)
    key = workdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = workdir / "munge.sock"
    cpus = len(os.sched_getaffinity(0))
    mem_mb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1]) // 1024
    conf = workdir / "slurm.conf"
    (workdir / "plugstack.conf").write_text("")
    conf.write_text(textwrap.dedent(f"""\
        ClusterName=fsltest
        SlurmctldHost=localhost(127.0.0.1)
        SlurmctldPort={free_port()}
        SlurmdPort={free_port()}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        CredType=cred/munge
        AuthInfo=socket={sock}
        StateSaveLocation={workdir / "state"}
        SlurmdSpoolDir={workdir / "spool"}
        SlurmctldPidFile={workdir / "slurmctld.pid"}
        SlurmdPidFile={workdir / "slurmd.pid"}
        SlurmctldLogFile={workdir / "slurmctld.log"}
        SlurmdLogFile={workdir / "slurmd.log"}
        PlugStackConfig={workdir / "plugstack.conf"}
        MailProg=/bin/true
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        MpiDefault=none
        SchedulerType=sched/backfill
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU_Memory
        SlurmdParameters=config_overrides
        ReturnToService=2
        KillWait={kill_wait_s}
        NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
        PartitionName={partition} Nodes=localhost Default=YES MaxTime={max_time_min} State=UP
        """))
    cluster = SlurmCluster(conf, workdir, cpus, mem_mb, partition, max_time_min)
    cenv = cluster.env()
    procs = []
    try:
        procs.append(_daemon([slurm_program("munged"), "--foreground", "--force", f"--socket={sock}",
                              f"--key-file={key}", f"--pid-file={workdir / 'munged.pid'}",
                              f"--seed-file={workdir / 'munged.seed'}"], workdir, "munged", env))
        for _ in range(100):
            if sock.exists() or procs[0].poll() is not None:
                break
            time.sleep(0.1)
        if not sock.exists():
            raise RuntimeError(f"munged did not start: {_tail(workdir / 'munged.out')}")
        procs.append(_daemon([slurm_program("slurmctld"), "-D", "-i", "-f", conf], workdir, "slurmctld", cenv))
        procs.append(_daemon([slurm_program("slurmd"), "-D", "-N", "localhost", "-f", conf], workdir, "slurmd",
                             cenv))
        deadline = time.time() + 90
        while True:
            for p, name in zip(procs, ("munged", "slurmctld", "slurmd")):
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {p.returncode}: {_tail(workdir / f'{name}.out')}")
            state = subprocess.run([str(slurm_program("sinfo")), "-h", "-N", "-o", "%T"], env=cenv,
                                   capture_output=True, text=True, timeout=30).stdout.strip()
            if state == "idle":
                break
            if time.time() > deadline:
                raise RuntimeError(f"the node did not become idle in 90 s (state {state!r}): "
                                   f"{_tail(workdir / 'slurmctld.out')}\n{_tail(workdir / 'slurmd.out')}")
            time.sleep(0.3)
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:
            subprocess.run([str(slurm_program("scancel")), "--full", "--user", "root"], env=cenv,
                           capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and subprocess.run(
                    [str(slurm_program("squeue")), "-h", "-o", "%i"], env=cenv, capture_output=True, text=True,
                    timeout=30).stdout.strip():
                time.sleep(0.5)
        for p in reversed(procs):  # slurmd, slurmctld, then munged
            _stop(p)
        for pid in _cluster_processes(conf):  # step daemons and jobs that outlived the cancel
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
