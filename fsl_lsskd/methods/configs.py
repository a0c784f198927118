"""The methods' configuration dataclasses, importable without torch (the configuration/modeling split of
Hugging Face Transformers): planning a grid, computing training identities and reading a benchmark file resolve
a method's settings and defaults from here, so `fsl-bench table --from-results`, `run --dry-run` and their error
messages import no torch. Each method's file (``fsl_lsskd/methods/<name>.py``) names its config as
``config_cls``; docs/methods.md gives every setting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

from ..errors import ConfigError


@dataclass(frozen=True)
class MethodConfig:
    """Optimisation settings shared by all methods. Defaults: RFS (Tian et al. 2020, WangYueFt/rfs
    train_supervised.py): SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64, 100 epochs, decay x0.1 at 60/80.

    ``lr_milestones`` are fractions of ``epochs`` so shortened CPU profiles keep the schedule's shape."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.6, 0.8)
    lr_gamma: float = 0.1

    #: fields added after cells were trained, with the default that reproduces the earlier training: left out
    #: of the training identity while at that default, so adding a setting does not retrain finished cells
    identity_omit_if_default: ClassVar[Tuple[str, ...]] = ()

    def identity_dict(self) -> Dict[str, object]:
        """The fields that enter the training identity (every field, but those of
        ``identity_omit_if_default`` that hold their default)."""
        import dataclasses

        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.identity_omit_if_default and value == f.default:
                continue
            out[f.name] = value
        return out


@dataclass(frozen=True)
class CEConfig(MethodConfig):
    """RFS defaults (WangYueFt/rfs train_supervised.py argparse defaults), which are
    :class:`~fsl_lsskd.methods.base.MethodConfig`'s: SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64, 100 epochs,
    x0.1 at 60/80."""

    label_smoothing: float = 0.0  # RFS uses plain CE


@dataclass(frozen=True)
class PSKDConfig(MethodConfig):
    """PS-KD CIFAR-100 recipe (lgcnsai/PS-KD-Pytorch README command and main.py defaults): SGD lr 0.1,
    momentum 0.9, Nesterov, wd 5e-4, batch 128, 300 epochs, lr x0.1 at 150 and 225; ``alpha_T = 0.8``."""

    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.5, 0.75)  # epochs 150, 225 of 300
    lr_gamma: float = 0.1
    alpha_T: float = 0.8
    #: prediction memory (``store_*``: names kept, they are in training identities): ``auto`` (dense rows, the reference, while they fit ``store_budget_mb``; else the
    #: ``store_top_k`` largest probabilities per sample), ``dense`` or ``topk``; docs/methods.md "Prediction memory"
    store_layout: str = "auto"
    store_top_k: int = 20
    store_budget_mb: float = 2048.0
    store_dtype: str = "float32"  # a dense memory's dtype (PS-KD keeps float32 on the CPU)

    def __post_init__(self) -> None:
        if self.store_layout not in ("auto", "dense", "topk"):
            raise ValueError(f"store_layout must be auto, dense or topk, got {self.store_layout!r}")


@dataclass(frozen=True)
class KDConfig(MethodConfig):
    """RFS optimisation defaults (train_distillation.py: SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64,
    100 epochs, x0.1 at 60/80); ``tau = 4`` (RFS), ``alpha = 0.9`` (RepDistiller KD)."""

    tau: float = 4.0
    alpha: float = 0.9


@dataclass(frozen=True)
class BYOTConfig(MethodConfig):
    """mmrazor BYOT ResNet-18/CIFAR-100 config: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128 (8x16),
    250 epochs, lr x0.1 at 80/160/240; CE weight 0.7, KL weight 0.3 at tau = 3, feature hint weight 0.03 for
    the first two shallow classifiers and 0 for the third; ``BYOTConnector`` heads (expansion 1, kernel 3,
    stride 2)."""

    epochs: int = 250
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.32, 0.64, 0.96)  # epochs 80, 160, 240 of 250
    lr_gamma: float = 0.1
    ce_weight: float = 0.7
    kd_weight: float = 0.3
    tau: float = 3.0
    feat_weights: Tuple[float, ...] = (0.03, 0.03, 0.0)  # one per shallow classifier
    deepest_ce_weight: float = 1.0
    head: str = "connector"  # "connector" (mmrazor BYOTConnector) | "stages" (copies of the remaining stages)
    feat_loss: str = "dist"  # "dist" (mmrazor L2Loss dist=True) | "mean_sq"

    def __post_init__(self) -> None:
        if self.head not in ("connector", "stages"):
            raise ValueError(f"head must be 'connector' or 'stages', got {self.head!r}")
        if self.feat_loss not in ("dist", "mean_sq"):
            raise ValueError(f"feat_loss must be 'dist' or 'mean_sq', got {self.feat_loss!r}")


@dataclass(frozen=True)
class HSAKDTeacherConfig(MethodConfig):
    """winycg/HSAKD train_teacher_cifar.py (joint, from scratch): SGD lr 0.05 (effective, see docs/methods.md, "LSSKD"),
    momentum 0.9, Nesterov, wd 5e-4, batch 64, 240 epochs, lr x0.1 at 150/180/210."""

    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: Tuple[float, ...] = (0.625, 0.75, 0.875)
    lr_gamma: float = 0.1


@dataclass(frozen=True)
class HSAKDConfig(HSAKDTeacherConfig):
    """winycg/HSAKD train_student_cifar.py: the teacher's recipe (SGD lr 0.05, momentum 0.9, Nesterov,
    wd 5e-4, batch 64, 240 epochs, lr x0.1 at 150/180/210), ``kd_T = 3``; all loss weights 1."""

    tau: float = 3.0
    weight_aux_kl: float = 1.0
    weight_kl: float = 1.0


@dataclass(frozen=True)
class LSSKDConfig(HSAKDTeacherConfig):
    """LSSKD's own hyperparameters were not recovered (docs/methods.md, "LSSKD"): HSAKD's CIFAR-100 recipe
    (winycg/HSAKD train_student_cifar.py: SGD lr 0.05, momentum 0.9, Nesterov, wd 5e-4, batch 64, 240 epochs,
    lr x0.1 at 150/180/210, KD temperature 3); ``alpha_T = 0.8`` from PS-KD (lgcnsai/PS-KD-Pytorch);
    ``lambda_kl = 1`` (HSAKD unit weights), ``lambda_feat = 0.03`` (mmrazor BYOT feature weight), docs/methods.md, "LSSKD"."""

    alpha_T: float = 0.8
    ls_final: bool = True
    ls_aux: bool = True
    xlayer_kl: bool = False
    lambda_kl: float = 1.0
    tau: float = 3.0
    feat_l2: bool = False
    lambda_feat: float = 0.03
    #: the auxiliary cross-entropy of a layer over its 4B rotated rows: ``mean`` (HSAKD's code: the mean over
    #: the 4B rows) or ``sum_rotations`` (the written formula: sum over the 4 rotations of the mean over the
    #: batch, 4x ``mean``)
    aux_rotation_reduction: str = "mean"
    #: prediction memories (``store_*``: names kept, they are in training identities): ``auto`` (dense rows while all of them fit ``store_budget_mb``, else the ``store_top_k``
    #: largest probabilities per row), ``dense`` or ``topk``; docs/methods.md "Prediction memory"
    store_layout: str = "auto"
    store_top_k: int = 20
    store_budget_mb: float = 2048.0
    final_store_dtype: str = "float32"  # dense memories' dtypes
    aux_store_dtype: str = "float16"  # N x 4 x 4C per layer

    def __post_init__(self) -> None:
        if self.store_layout not in ("auto", "dense", "topk"):
            raise ValueError(f"store_layout must be auto, dense or topk, got {self.store_layout!r}")
        if self.aux_rotation_reduction not in ("mean", "sum_rotations"):
            raise ValueError(f"aux_rotation_reduction must be 'mean' or 'sum_rotations', got "
                             f"{self.aux_rotation_reduction!r}")


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class EpisodicConfig(MethodConfig):
    """Settings shared by episodic methods. ``episodes_per_epoch`` counts *tasks*; an epoch yields
    ``ceil(episodes_per_epoch / tasks_per_batch)`` batches. 0 trains nothing: the run keeps (validates, exports
    and scores) the initial weights of its seed, a reference row for what training adds (``maml_untrained`` in
    ``benchmarks/cpu_tiny_imagenet.yaml``). ``optimizer`` must be honoured by the engine
    (``"sgd"`` uses ``lr/momentum/nesterov/weight_decay``; ``"adam"`` uses ``lr/weight_decay``).
    ``augment``: pass episode images through ``loader.augment`` (crop+flip+normalise) when True, else
    only normalise (the ProtoNet and MAML papers use no augmentation)."""

    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15
    episodes_per_epoch: int = 100
    optimizer: str = "adam"
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_way", "n_shot", "n_query"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.episodes_per_epoch) < 0:
            raise ConfigError(f"episodes_per_epoch must be >= 0 (0: no training), got {self.episodes_per_epoch!r}")
        if self.n_way < 2:
            raise ConfigError(f"n_way must be >= 2 for a classification episode, got {self.n_way}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def task_size(self) -> int:
        return self.n_way * (self.n_shot + self.n_query)


@dataclass(frozen=True)
class ProtoNetConfig(EpisodicConfig):
    """Defaults from Snell et al. 2017 (§3.2 miniImageNet) and their code's defaults
    (``scripts/train/few_shot/run_train.py``):

    - Adam, lr 1e-3, no weight decay; lr halved every 2000 episodes: with 100 episodes per epoch
      (their ``--data.train_episodes 100``) and 100 epochs that is ``lr_milestones`` at 0.2/0.4/0.6/0.8
      of training with ``lr_gamma`` 0.5 (10 000 episodes; the paper trains to a validation plateau).
    - 15 queries per class; training shot = test shot (5). The paper trains miniImageNet with 20-way
      (5-shot) / 30-way (1-shot) episodes ("higher way helps"); we default to 5-way so the cost per
      episode stays small on CPU -- set ``n_way: 20`` for the paper's setting.
    - No augmentation (``augment=False``) as in the paper.

    CPU profiles shorten ``epochs``/``episodes_per_epoch``; the milestones are fractions, so the schedule
    keeps its shape, but such runs see far fewer episodes than the paper's and are not comparable to its
    numbers.
    """

    epochs: int = 100
    episodes_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: Tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    lr_gamma: float = 0.5
    optimizer: str = "adam"
    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15


HEADS = ("normal", "xavier", "zero")


@dataclass(frozen=True)
class MAMLConfig(EpisodicConfig):
    """Defaults: Finn et al. 2017 §5.2 miniImageNet and cbfinn/maml ``main.py`` flags
    (``--update_lr=0.01 --num_updates=5 --meta_batch_size=4|2 --meta_lr=0.001 --num_filters=32``):

    - ``inner_lr`` 0.01, ``inner_steps`` 5 at meta-training, ``test_inner_steps`` 10 at meta-test;
    - meta-optimiser Adam, ``lr`` (meta lr) 1e-3, constant (no milestones), no weight decay;
    - ``meta_batch_size`` 2 tasks, the paper's 5-shot value (4 for 1-shot: set it with ``n_shot: 1``);
    - 5-way, 5-shot, 15 queries per class (cbfinn/maml samples ``update_batch_size + 15`` per class);
    - schedule: 60 000 meta-iterations x 2 tasks = ``epochs`` 100 x ``episodes_per_epoch`` 1200 tasks;
    - ``head``: the linear head's initial weights, meta-learned from ``normal`` (N(0,1), zero bias: cbfinn/maml's
      Omniglot model) or ``xavier`` (Xavier-uniform, zero bias: cbfinn/maml's mini-ImageNet model and learn2learn
      0.2.0's ``CNN4``), or ``zero`` (the zeroing trick of Kao et al., "MAML is a Noisy Contrastive Learner in Classification", ICLR
      2022, §4: the head starts every task at zero, before every outer step and at meta-test, so only the inner
      loop fits it; with one inner step it is a prototype-like classifier of the support features);
    - no augmentation. Backbone: the paper's Conv-4 has 32 filters; our ``conv4`` backbone has the width
      the backbone registry gives it (pooled features), so the architecture is close to, not exactly,
      the paper's.

    CPU scaling (honest): second-order MAML costs ~(inner_steps+2) forward/backward passes per task, so
    the CPU profiles train a tiny fraction of the paper's 120 000 tasks (e.g. 3 epochs x 200 tasks =
    0.5 %, with ``inner_steps`` kept at 5). Numbers from such runs show that the pipeline works; they are
    not reproductions of the paper's 63.1 % (5-shot) / 48.7 % (1-shot).
    """

    epochs: int = 100
    episodes_per_epoch: int = 1200
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: Tuple[float, ...] = ()
    optimizer: str = "adam"
    n_way: int = 5
    n_shot: int = 5
    n_query: int = 15
    inner_lr: float = 0.01
    inner_steps: int = 5
    test_inner_steps: int = 10
    meta_batch_size: int = 2
    head: str = "normal"

    identity_omit_if_default: ClassVar[Tuple[str, ...]] = ("head",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.inner_steps < 1 or self.test_inner_steps < 1 or self.meta_batch_size < 1:
            raise ConfigError("inner_steps, test_inner_steps and meta_batch_size must be >= 1")
        if self.inner_lr <= 0:
            raise ConfigError(f"inner_lr must be > 0, got {self.inner_lr}")
