"""The ``fsl-bench`` command line. Subcommands load lazily so ``fsl-bench --help`` does not import torch.

Every :class:`~fsl_lsskd.errors.UserError` ends the command with its message on stderr and exit code 2, and so
does an ``OSError`` meaning an output cannot be written (disk full, read-only, permission denied).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Dict, List, Optional

import click

# name -> "module:attribute" of a click command; a subcommand is added by one line here.
COMMANDS: Dict[str, str] = {
    "ls": "fsl_lsskd.cli:ls_cmd",
    "train": "fsl_lsskd.train.cli:train_cmd",
    "export": "fsl_lsskd.train.cli:export_cmd",
    "data": "fsl_lsskd.data.cli:data",
    "run": "fsl_lsskd.bench.commands:run",
    "table": "fsl_lsskd.bench.commands:table",
    "evaluate": "fsl_lsskd.eval.cli:evaluate",
    "bench": "fsl_lsskd.bench.cli:bench",
}


def _quiet_third_party() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class LazyCommands(click.Group):
    """A click group whose subcommands (``lazy_commands``: name -> "module:attribute") are imported only
    when run, so ``--help`` stays fast (torch, timm and mlflow take seconds to import)."""

    lazy_commands: Dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in self.lazy_commands:
            return None
        module, attr = self.lazy_commands[name].split(":")
        return getattr(importlib.import_module(module), attr)


class LazyGroup(LazyCommands):
    """The top-level group: its subcommands, and every :class:`UserError` as a message with exit code 2."""

    lazy_commands = COMMANDS

    def invoke(self, ctx: click.Context):
        from .errors import UserError
        from .utils import output_error

        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # disk full / read-only / permission denied outside the atomic writers
            err = output_error(exc)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="fsl-lsskd")
def main(verbose: int) -> None:
    """fsl-bench: few-shot learning benchmark suite.

    \b
    Example:
      fsl-bench ls
      fsl-bench data verify tiny_imagenet --archive tiny-imagenet-200.zip
    """
    _quiet_third_party()
    level = logging.WARNING - 10 * min(verbose, 2)  # warnings by default, -v info, -vv debug
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.command("ls")
def ls_cmd() -> None:
    """List what is registered: datasets, backbones, methods, evaluators.

    \b
    Example:
      fsl-bench ls
    """
    from . import plugins
    from .registry import BACKBONES, DATASETS, EVALUATORS, METHODS

    plugins.load_all()
    for title, reg in (("datasets", DATASETS), ("backbones", BACKBONES), ("methods", METHODS),
                       ("evaluators", EVALUATORS)):
        click.echo(f"{title}:")
        for name in reg.names():
            obj = reg.get(name)
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            click.echo(f"  {name:<16} {doc[0] if doc else ''}")
    click.echo("backbones: also any timm CNN by name (e.g. resnet18, efficientnet_b0), adapted to small inputs")


if __name__ == "__main__":  # pragma: no cover
    main()
