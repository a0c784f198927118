"""Pure loss functions shared by BYOT, LSSKD, KD and HSAKD (no state, no modules).

Conventions: logits ``[B, K]``; targets are probability rows ``[B, K]``; reductions are means over the batch
("batchmean" for KL, as winycg/HSAKD ``DistillKL`` and Hinton KD implementations do)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_c -targets[b,c] * log_softmax(logits)[b,c]`` (PS-KD loss/pskd_loss.py; LSSKD ls terms)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(t/tau) || softmax(s/tau))``, batchmean (Hinton et al. 2015; winycg/HSAKD
    ``DistillKL``). The teacher side is used as given: detach it at the call site when it must not learn."""
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (tau * tau)


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              alpha: float, tau: float):
    """``(1 - alpha) * CE(s, y) + alpha * tau^2 * KL(t^tau || s^tau)``; returns ``(total, ce, kl)``."""
    ce = F.cross_entropy(student_logits, labels)
    kl = kd_kl(student_logits, teacher_logits, tau)
    return (1.0 - alpha) * ce + alpha * kl, ce, kl


def feature_l2(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b ||feat_b - target_b||^2``: squared L2 distance per sample, averaged over the batch (LSSKD's
    feature term; BYOT ``feat_loss="mean_sq"``)."""
    return (feat - target).pow(2).flatten(1).sum(dim=1).mean()


def feature_l2_dist(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum over batch and dimensions of (feat - target)^2)``: the Frobenius distance of the batch
    (mmrazor ``L2Loss(normalize=False, dist=True)``, BYOT's feature hint). With weight 0.03: ``B=1, f=[[3]],
    t=[[0]]`` gives 0.09; ``B=2, f=I, t=0`` gives 0.0424."""
    return (feat - target).pow(2).sum().sqrt()


def alpha_schedule(alpha_T: float, epoch: int, epochs: int) -> float:
    """``alpha_e = alpha_T * (e + 1) / E`` for 0-based epoch ``e`` (PS-KD main.py), clipped to [0, alpha_T]."""
    return min(float(alpha_T), max(0.0, float(alpha_T) * (epoch + 1) / float(epochs)))


def softened_targets(onehot: torch.Tensor, previous: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * onehot + alpha * previous`` (PS-KD / LSSKD hierarchical label softening)."""
    return (1.0 - alpha) * onehot + alpha * previous.to(onehot.dtype)
