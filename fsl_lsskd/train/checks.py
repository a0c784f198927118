"""Up-front checks of a training run (``fsl-bench train``), before any data is decoded or MLflow run opened: the
names are registered, the backbone takes the image size, ``--out`` can be written and its resume state is
readable, and the val split can host the validation episodes."""
from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import DataError
from ..protocol import check_capacity
from ..registry import check_names
from .config import TrainConfig, resolved_method_config

CHECKPOINT_NAME = "last.pt"


def check_resume_checkpoint(out_dir: Path) -> None:
    """A run directory's ``last.pt`` (resumed by the engine) must be readable: a truncated file fails here, before
    the data is decoded. Cheap: opens the zip directory only (torch checkpoints are zip files)."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return
    try:
        with zipfile.ZipFile(path):
            return
    except (zipfile.BadZipFile, OSError):
        from ..checkpoint import read_training_state

        read_training_state(path)  # raises CheckpointError naming the fix


def check_train_config(cfg: TrainConfig) -> None:
    """Raise a :class:`~fsl_lsskd.errors.UserError` (exit 2) for anything wrong with ``cfg`` that can be found
    without training. A name or the data's location is checked before anything imports torch (seconds)."""
    from ..data import get_dataset
    from ..utils import check_writable_dir

    check_names(methods=[cfg.method], datasets=[cfg.dataset], backbones=[cfg.backbone])
    check_writable_dir(cfg.out_dir, "--out")
    kw = cfg.data_kwargs()
    ds = None
    if kw.pop("download", False):
        try:  # no download in the checks (every torchrun process runs them): the engine fetches, rank 0 first
            ds = get_dataset(cfg.dataset, **kw)
        except DataError:
            pass  # not fetched yet: the engine downloads it, then validation checks the val split itself
    else:
        ds = get_dataset(cfg.dataset, **kw)  # finds the archive or folder; decodes nothing
    from ..backbones import check_image_size
    from ..data.base import split_counts

    resolved_method_config(cfg)
    check_image_size(cfg.backbone, cfg.image_size)
    check_resume_checkpoint(Path(cfg.out_dir))
    if cfg.validation is not None:
        from ..eval.episodes import check_episode_memory

        check_episode_memory([cfg.validation], "--val-n-episodes", probabilities=False,
                             fix="lower --val-n-episodes (the default is 200; 0 disables validation)")
    if cfg.validation is not None and ds is not None:
        check_capacity(split_counts(ds, "val"), cfg.validation, ds.class_split()["val"],
                       where=f"{cfg.dataset} val split (validation: {cfg.validation.key} x{cfg.validation.n_episodes} "
                             f"every epoch)",
                       fix="pass --val-n-episodes 0 (no per-epoch validation) or lower --val-n-shot/--val-n-query")
