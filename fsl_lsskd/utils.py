"""Small shared helpers: atomic file writes, hashing, cache directory, the epoch progress bar (random streams:
:mod:`fsl_lsskd.seeding`)."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:
    from .errors import OutputError

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)

CACHE_ENV = "FSL_BENCH_CACHE"


def cache_dir() -> Path:
    """Root of the decoded-data and feature caches: ``$FSL_BENCH_CACHE`` or ``~/.cache/fsl-bench``.

    Never inside the package, so an installed package stays read-only."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fsl-bench"
    return root


MALLOC_ENV = "FSL_BENCH_MALLOC"
#: glibc's own malloc settings; when the user set any of them, :func:`retain_freed_memory` leaves malloc alone
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_TRIM_THRESHOLD = 2 ** 31 - 1  # bytes: the largest value mallopt takes (an int)
_malloc_setting: Optional[str] = None


def retain_freed_memory() -> str:
    """Make glibc's malloc keep the memory that tensors free for the next step, instead of handing it back to the
    kernel and page-faulting it in again: ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from a
    fresh ``mmap`` each time) and ``mallopt(M_TRIM_THRESHOLD, 2 GiB)`` (the heap's free top is kept up to 2 GiB).

    A training step allocates and frees the same activation and gradient buffers every step. With glibc's defaults
    the large ones (16.8 MB for one Conv-4 map of a batch of 64 at 32x32) are ``mmap``-ed and unmapped each time,
    so every step page-faults them in anew: 5,000-17,000 minor faults per Conv-4 CE step, about a third of a
    1-thread step (docs/performance.md). This is what the PyTorch CPU performance guide gets from jemalloc or
    TCMalloc, done with glibc itself: no preload, no dependency. It changes no arithmetic, only where freed memory
    waits; the process's resident memory stays near its peak instead of shrinking between steps.

    Called by the training and scoring commands (``fsl-bench train``, ``run``, ``evaluate``, ``perf`` and the
    jobs of ``run --launcher``). ``FSL_BENCH_MALLOC=system`` keeps glibc's defaults; so does any of glibc's own
    ``MALLOC_*_`` settings (:data:`GLIBC_MALLOC_ENV`) or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``, which
    are left as the user set them. Elsewhere than glibc (macOS, musl) nothing is changed.

    Returns what was done, for logs and ``fsl-bench perf train``: ``"retained"``, ``"system (FSL_BENCH_MALLOC)"``,
    ``"system (user's MALLOC_* settings)"`` or ``"system (not glibc)"``. Idempotent.
    """
    global _malloc_setting
    if _malloc_setting is not None:
        return _malloc_setting
    if os.environ.get(MALLOC_ENV, "retain").strip().lower() == "system":
        _malloc_setting = f"system ({MALLOC_ENV})"
    elif any(os.environ.get(k) for k in GLIBC_MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        _malloc_setting = "system (user's MALLOC_* settings)"
    else:
        _malloc_setting = _mallopt_retain()
    log.debug("malloc: %s", _malloc_setting)
    return _malloc_setting


def malloc_setting() -> str:
    """What :func:`retain_freed_memory` did in this process, or ``"system (not set by fsl-bench)"``."""
    return _malloc_setting or "system (not set by fsl-bench)"


def _mallopt_retain() -> str:
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "system (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return "system (not glibc)"
    return "retained" if ok else "system (mallopt refused)"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux, else the machine's logical cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_threads(processes: int) -> int:
    """Threads of each of ``processes`` concurrent trainings: :func:`usable_cores` shared evenly (at least 1)."""
    return max(1, usable_cores() // max(1, processes))


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# errno values that mean "this location cannot be written": turned into an OutputError naming the fix
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


#: messages of writers that report a full disk without an errno (safetensors' Rust writer, SQLite)
_FULL_DISK_TEXT = ("no space left on device", "os error 28", "database or disk is full")


def free_space(path: PathLike) -> str:
    """Free space of the file system holding ``path`` (its nearest existing ancestor) for this user, e.g.
    ``12.3 MiB``; ``unknown`` when it cannot be read."""
    from .bounds import format_bytes

    free = _free_bytes(path)
    return "unknown" if free is None else format_bytes(free)


def _free_bytes(path: PathLike) -> Optional[int]:
    try:
        st = os.statvfs(_existing_ancestor(Path(path)))
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize  # root may use the reserved blocks


def full_disk_cause(exc: BaseException, written: Optional[PathLike] = None) -> Optional[OSError]:
    """An ``OSError(ENOSPC)`` when ``exc`` means a write ran out of disk space, else None. Writers say so
    differently: an ``OSError`` with errno ENOSPC/EDQUOT anywhere in the exception chain (``torch.save`` to a file
    object raises ``RuntimeError: [enforce fail at inline_container.cc...]`` from it), a message naming the full
    disk (safetensors, SQLite), or, for a failed write of ``written`` (a partly written file, still on disk), a
    file system left with less than 1 MiB free (``numpy.save`` raises ``OSError("N requested and M written")``
    without an errno)."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if any(text in str(e).lower() for text in _FULL_DISK_TEXT):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(written) if written else None)
        e = e.__cause__ or e.__context__
    if written is not None:
        free = _free_bytes(Path(written).parent)
        if free is not None and free < (1 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(written))
    return None


def output_error(exc: OSError, path: Optional[PathLike] = None, elsewhere: str = "") -> Optional["OutputError"]:
    """An :class:`~fsl_lsskd.errors.OutputError` (one line) naming the directory and the fix for an ``OSError``
    that means the location cannot be written (disk full, with the free space left; quota; read-only file
    system; permission denied); ``None`` for any other error. ``elsewhere`` replaces the default advice on
    where else to write (``--out``, ``$FSL_BENCH_CACHE``)."""
    from .errors import OutputError

    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    target = Path(path if path is not None else (exc.filename or ""))
    where = str(target) if str(target) not in ("", ".") else "an output file"
    folder = _existing_ancestor(target if target.is_dir() else target.parent)  # the one that refused
    elsewhere = elsewhere or (f"or choose another directory (--out for outputs, ${CACHE_ENV} for the data and "
                              f"feature cache) and run the command again")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large"}[exc.errno]
        msg = (f"cannot write {where}: {reason} on the device holding {folder} ({free_space(folder)} free). "
               f"Free disk space there {elsewhere}")
    elif exc.errno == errno.EROFS:
        msg = f"cannot write {where}: {folder} is on a read-only file system. Mount it read-write {elsewhere}"
    else:
        msg = (f"cannot write {where}: permission denied in {folder}. Make it writable for this user "
               f"(chmod u+w {folder}) {elsewhere}")
    return OutputError(msg)


@contextlib.contextmanager
def output_errors(path: Optional[PathLike] = None) -> Iterator[None]:
    """Re-raise an ``OSError`` that means ``path`` cannot be written as :func:`output_error`'s
    :class:`~fsl_lsskd.errors.OutputError`; any other error passes through unchanged."""
    try:
        yield
    except OSError as exc:
        err = output_error(exc, path)
        if err is None:
            raise
        raise err from exc


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: PathLike, option: str = "--out") -> None:
    """Fail fast (before any work) when directory ``path`` cannot be created or written by this process:
    raises :class:`~fsl_lsskd.errors.OutputError` naming ``option`` and the fix. Nothing is created."""
    from .errors import OutputError

    probe = _existing_ancestor(Path(path).expanduser().absolute())
    if not probe.is_dir():
        raise OutputError(f"{option} {path}: {probe} is a file, not a directory; choose another {option}")
    # os.access honours read-only mounts even for root (root ignores permission bits, and can indeed write)
    if not os.access(probe, os.W_OK | os.X_OK):
        how = ("is on a read-only file system" if _read_only_fs(probe) else "is not writable by this user")
        raise OutputError(f"{option} {path}: {probe} {how}; choose a writable directory with {option} "
                          f"(or make {probe} writable: chmod u+w {probe})")


def make_dir(path: PathLike) -> Path:
    """``mkdir -p path``; a directory that cannot be created (read-only, permission denied, disk full) raises
    :class:`~fsl_lsskd.errors.OutputError` naming it and the fix."""
    path = Path(path)
    with output_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _temp_prefix(dest: Path) -> str:
    # host and pid in the name let a later writer of the same file remove temp files of dead writers
    return f".{dest.name}.{socket.gethostname()}~{os.getpid()}~"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(dest: PathLike) -> int:
    """Delete temp files of ``dest`` left by writers on this host that were killed mid-write (SIGKILL,
    power loss of the process); temp files of live writers are kept. Returns how many were removed."""
    dest = Path(dest)
    host = socket.gethostname()
    removed = 0
    for p in dest.parent.glob(glob.escape(f".{dest.name}.") + "*~*~*.tmp"):
        fields = p.name[len(dest.name) + 2:].split("~")
        if len(fields) < 3 or fields[0] != host or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid != os.getpid() and not pid_alive(pid):
            p.unlink(missing_ok=True)
            removed += 1
            log.info("removed %s, left by killed process %d", p, pid)
    return removed


#: the signals :func:`signals_deferred` holds back: Ctrl-C and SIGTERM
DEFERRED_SIGNALS = ("SIGINT", "SIGTERM")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block ends (blocked, then delivered): for steps that must not
    stop halfway, such as moving a set of finished files into place or reaping worker processes. A process forked
    inside the block starts with them blocked."""
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, n) for n in DEFERRED_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextlib.contextmanager
def atomic_path(dest: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed onto ``dest`` (atomic on POSIX),
    on failure it is removed, so readers never see a half-written file. A disk-full / read-only /
    permission failure raises :class:`~fsl_lsskd.errors.OutputError` naming the directory and the fix."""
    dest = Path(dest)
    with output_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    with output_errors(dest):
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
            os.replace(tmp_path, dest)
        except BaseException as exc:
            # a writer that reports a full disk in its own way (torch, safetensors, numpy): told before the
            # partial file is removed, then raised as the ENOSPC it is (output_errors names the directory)
            known = isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS
            full = full_disk_cause(exc, tmp_path) if isinstance(exc, Exception) and not known else None
            tmp_path.unlink(missing_ok=True)
            if full is not None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dest)) from exc
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(dest: PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(dest: PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_torch_save(obj: object, dest: PathLike) -> None:
    """``torch.save`` atomically (:func:`atomic_path`). Written through a Python file object, so a full disk
    surfaces as the ``OSError(ENOSPC)`` it is (torch's C++ writer given a path only says "unexpected pos")."""
    import torch

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's message (torch's unpickler errors run to many paragraphs)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def project_root() -> Path:
    """The repository root (holds ``splits/`` and ``benchmarks/``) when running from a checkout."""
    return Path(__file__).resolve().parent.parent
