"""Import shim for learn2learn (episodic meta-learners only).

learn2learn 0.2.0 has no wheel and its sdist does not build on CPython >= 3.11 as published, so it is
not a plain dependency: ``tools/install_learn2learn.sh`` rebuilds it (``tools/setup.sh`` runs it). The
import is lazy because ``import learn2learn`` costs ~5 s and most commands never need it.
"""
from __future__ import annotations

from types import ModuleType

from .errors import UserError

INSTALL_HINT = ("learn2learn is not installed (needed by the episodic methods protonet/maml/fomaml and the "
                "maml_finetune readout). Install it with `bash tools/install_learn2learn.sh` "
                "(uses $PYTHON, default `python`; e.g. `PYTHON=.venv/bin/python bash tools/install_learn2learn.sh`) "
                "or set up the whole environment with `bash tools/setup.sh`.")


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is missing; the message says how to install it."""


def require_learn2learn() -> ModuleType:
    """Return the ``learn2learn`` module or raise :class:`MissingDependencyError` naming the install command."""
    try:
        import learn2learn  # noqa: PLC0415 (lazy on purpose)
    except ImportError as exc:  # also raised when sys.modules['learn2learn'] is None
        raise MissingDependencyError(f"{INSTALL_HINT} ({exc})") from exc
    return learn2learn
