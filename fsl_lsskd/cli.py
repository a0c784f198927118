"""The ``fsl-bench`` command line. Subcommands load lazily so ``fsl-bench --help`` does not import torch.

Every :class:`~fsl_lsskd.errors.UserError` ends the command with its message on stderr and exit code 2, and so
does an output or MLflow store that cannot be written (disk full, read-only, permission denied). Ctrl-C ends it
with exit code 130, SIGTERM with 143, both after marking its MLflow runs KILLED.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Dict, Optional

import click

from .options import LazyCommands

# name -> "module:attribute" of a click command; a subcommand is added by one line here.
COMMANDS: Dict[str, str] = {
    "ls": "fsl_lsskd.cli:ls_cmd",
    "train": "fsl_lsskd.train.cli:train_cmd",
    "export": "fsl_lsskd.edge.cli:export_cmd",
    "edge": "fsl_lsskd.bench.edge_cmd:edge",
    "data": "fsl_lsskd.data.cli:data",
    "run": "fsl_lsskd.bench.commands:run",
    "table": "fsl_lsskd.bench.commands:table",
    "publish": "fsl_lsskd.bench.commands:publish_cmd",
    "evaluate": "fsl_lsskd.eval.cli:evaluate",
    "perf": "fsl_lsskd.perf:perf",
    "bench": "fsl_lsskd.perf:bench",  # deprecated name of `perf` (hidden)
    "store": "fsl_lsskd.migrate:store",
}


#: the subcommands whose OpenMP threads wait passively (:func:`_thread_defaults`); not ``edge``/``export``, whose
#: latency workers measure the runtimes as configured by the user
PASSIVE_WAIT_COMMANDS = frozenset({"train", "run", "evaluate", "perf", "bench"})


def _thread_defaults(subcommand: Optional[str]) -> None:
    """For :data:`PASSIVE_WAIT_COMMANDS`, OpenMP threads that wait for work sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``), unless the user set a policy. Set before torch is imported (the lazy
    subcommands import it), since OpenMP reads it once. On a shared CPU (more runnable threads than cores)
    spinning threads steal the cores their peers need: Conv-4 CE trained 6-8x faster with 2 threads under load
    (docs/performance.md). It changes no result, only waiting; ``OMP_WAIT_POLICY=ACTIVE`` restores spinning on
    a dedicated machine. These commands also keep freed memory for the next step
    (:func:`~fsl_lsskd.utils.retain_freed_memory`; ``FSL_BENCH_MALLOC=system`` keeps glibc's defaults)."""
    if subcommand in PASSIVE_WAIT_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .utils import retain_freed_memory

        retain_freed_memory()


def _quiet_third_party() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class LazyGroup(LazyCommands):
    """The top-level group: its subcommands, and every :class:`UserError` as a message with exit code 2."""

    lazy_commands = COMMANDS

    def invoke(self, ctx: click.Context):
        from .errors import Terminated, UserError
        from .record import store_error
        from .utils import output_error

        previous = _on_sigterm_raise()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM is not a crash: no traceback, the shell's code
            terminated = isinstance(exc, Terminated)
            # the command is over: a further Ctrl-C while the interpreter shuts down ends it at once, without the
            # "Exception ignored ... KeyboardInterrupt" traceback Python prints from threading._shutdown
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            click.echo("\nterminated (SIGTERM)" if terminated else "\ninterrupted", err=True)
            ctx.exit(143 if terminated else 130)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except Exception as exc:  # a store or an output that cannot be written: disk full, read-only, denied
            err = store_error(exc) or (output_error(exc) if isinstance(exc, OSError) else None)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _on_sigterm_raise():
    """In the main thread, make SIGTERM raise :class:`~fsl_lsskd.errors.Terminated` (a KeyboardInterrupt), so a
    killed command ends like Ctrl-C: its MLflow runs are marked KILLED, not left RUNNING. Returns the previous
    handler (None when not installed)."""
    import threading

    from .errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="fsl-lsskd")
def main(verbose: int) -> None:
    """fsl-bench: few-shot learning benchmark suite.

    \b
    Example:
      fsl-bench ls
      fsl-bench data verify tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip
    """
    from .progress import configure

    _quiet_third_party()
    _thread_defaults(click.get_current_context().invoked_subcommand)
    level = logging.WARNING - 10 * min(verbose, 2)  # warnings by default, -v info, -vv debug
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    configure()  # progress on stderr: bars on a terminal, else timestamped lines (FSL_BENCH_PROGRESS overrides)


def summary_line(obj) -> str:
    """The first sentence of an object's docstring, without reStructuredText markup (``fsl-bench ls``)."""
    import re

    doc = " ".join((getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0].split())
    doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc)          # :class:`~a.b.C` -> a.b.C
    doc = re.sub(r"``([^`]+)``", r"\1", doc).replace("`", "")
    for m in re.finditer(r"[.!?](?=\s|$)", doc):  # the first sentence end that is not an abbreviation
        words = doc[:m.start()].split()
        if not words or words[-1].lower() not in ("al", "e.g", "i.e", "vs", "cf", "fig", "eq"):
            return doc[:m.end()]
    return doc


@click.command("ls")
def ls_cmd() -> None:
    """List what is registered: datasets, backbones, methods, readouts.

    \b
    Example:
      fsl-bench ls
    """
    from .registry import ALL

    for title, reg in ALL.items():
        click.echo(f"{title}:")
        for name in reg.names():
            click.echo(f"  {name:<16} {summary_line(reg.get(name))}")
    click.echo("backbones: also any timm CNN by name (e.g. resnet18, efficientnet_b0), adapted to small inputs")


if __name__ == "__main__":  # pragma: no cover
    main()
