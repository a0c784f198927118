"""Logistic-regression readout solved for all episodes at once (batched L-BFGS in float64).

Same objective as scikit-learn's multinomial ``LogisticRegression(C=1.0)`` (L2 penalty) used by RFS
(Tian et al., ECCV 2020; WangYueFt/rfs ``eval/meta_eval.py``): ``C * sum_i logloss(W x_i + b, y_i) +
0.5 ||W||^2`` with an unpenalised intercept, on L2-normalised features. By the representer theorem the
minimiser's rows lie in the span of the support features, so each episode is reduced exactly to ``n``
dimensions with an orthonormal basis ``Q`` of that span (``X^T = Q R``): ``W = V Q^T``, ``||W|| = ||V||``,
features ``X Q``. The reduced problems (``n_way * (n + 1)`` unknowns each, well conditioned: identity
penalty, unit-norm features) are solved together by L-BFGS (Nocedal & Wright, Alg. 7.4/7.5) with a
batched Armijo backtracking line search, to a gradient tolerance far below scikit-learn's ``tol=1e-4``.
"""
from __future__ import annotations

import logging

import torch

from ..registry import READOUTS
from .base import EpisodeInputs, Readout, ReadoutOutput, l2_normalize, support_query_features
from .configs import LogRegConfig

log = logging.getLogger(__name__)


def _fg(theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, C: float, n_way: int):
    """Objective and gradient; theta [e, W*(n+1)] = (V [W,n] | b [W]) flattened."""
    e, _, k = X.shape
    T = theta.view(e, n_way, k + 1)
    V, b = T[..., :k], T[..., k]
    Z = X @ V.transpose(1, 2) + b[:, None, :]                     # [e,n,W]
    lse = torch.logsumexp(Z, -1)
    f = C * (lse - (Z * Y).sum(-1)).sum(-1) + 0.5 * (V * V).sum((1, 2))
    G = C * (torch.softmax(Z, -1) - Y)                             # [e,n,W]
    gV = G.transpose(1, 2) @ X + V
    gb = G.sum(1)
    return f, torch.cat([gV, gb[..., None]], -1).reshape(e, -1)


def fit_logreg_batched(xs: torch.Tensor, ys: torch.Tensor, n_classes: int, C: float = 1.0,
                       max_iter: int = 500, tol: float = 1e-6, memory: int = 10):
    """Fit one multinomial L2 logistic regression per episode (sklearn's objective).

    Args: ``xs`` float64 ``[E, n, D]`` support features, ``ys`` int64 ``[E, n]`` labels in 0..n_classes-1.
    Returns ``(W [E, n_classes, D], b [E, n_classes])``."""
    E, n, D = xs.shape
    Q, R = torch.linalg.qr(xs.transpose(1, 2))                    # Q [E,D,k], k = min(D, n)
    X = xs @ Q                                                      # [E,n,k] reduced features
    k = X.shape[-1]
    Y = torch.nn.functional.one_hot(ys, n_classes).to(xs.dtype)
    theta = torch.zeros(E, n_classes * (k + 1), dtype=xs.dtype, device=xs.device)
    f, g = _fg(theta, X, Y, C, n_classes)
    S: list = []                                                    # L-BFGS history, each [E, P]
    Yh: list = []
    active = g.abs().amax(1) > tol
    it = 0
    for it in range(max_iter):
        idx = active.nonzero(as_tuple=True)[0]
        if len(idx) == 0:
            break
        # only the unconverged episodes are touched (gathered), so stragglers cost little
        th, fa, ga, Xa, Ya = theta[idx], f[idx], g[idx], X[idx], Y[idx]
        Sa, Ha = [x[idx] for x in S], [x[idx] for x in Yh]
        q = ga.clone()
        alphas = []
        rhos = [1.0 / (u * v).sum(1).clamp_min(1e-300) for u, v in zip(Sa, Ha)]
        for u, v, rho in reversed(list(zip(Sa, Ha, rhos))):
            a = rho * (u * q).sum(1)
            q -= a[:, None] * v
            alphas.append(a)
        if Sa:
            gamma = (Sa[-1] * Ha[-1]).sum(1) / (Ha[-1] * Ha[-1]).sum(1).clamp_min(1e-300)
            q *= gamma[:, None]
        for (u, v, rho), a in zip(zip(Sa, Ha, rhos), reversed(alphas)):
            q += (a - rho * (v * q).sum(1))[:, None] * u
        d = -q
        gd = (ga * d).sum(1)
        bad = gd >= 0                                               # not a descent direction: steepest descent
        if bool(bad.any()):
            d = torch.where(bad[:, None], -ga, d)
            gd = (ga * d).sum(1)
        # batched Armijo backtracking, evaluated on the still-pending episodes only
        t = torch.ones(len(idx), dtype=xs.dtype, device=xs.device)
        new_th, new_f, new_g = th.clone(), fa.clone(), ga.clone()
        pend = torch.arange(len(idx), device=xs.device)
        for _ in range(40):
            cand = th[pend] + t[pend, None] * d[pend]
            fc, gc = _fg(cand, Xa[pend], Ya[pend], C, n_classes)
            ok = fc <= fa[pend] + 1e-4 * t[pend] * gd[pend]
            okp = pend[ok]
            new_th[okp], new_f[okp], new_g[okp] = cand[ok], fc[ok], gc[ok]
            pend = pend[~ok]
            if len(pend) == 0:
                break
            t[pend] *= 0.5
        moved = torch.ones(len(idx), dtype=torch.bool, device=xs.device)
        moved[pend] = False
        s_new, y_new = new_th - th, new_g - ga
        keep = moved & ((s_new * y_new).sum(1) > 1e-12)
        if Sa:  # a rejected pair repeats the previous one (keeps gamma well defined)
            s_new = torch.where(keep[:, None], s_new, Sa[-1])
            y_new = torch.where(keep[:, None], y_new, Ha[-1])
        fullS = torch.zeros_like(theta) if not S else S[-1].clone()
        fullY = torch.zeros_like(theta) if not Yh else Yh[-1].clone()
        fullS[idx], fullY[idx] = s_new, y_new
        S.append(fullS)
        Yh.append(fullY)
        if len(S) > memory:
            S.pop(0)
            Yh.pop(0)
        theta[idx], f[idx], g[idx] = new_th, new_f, new_g
        # converged: small gradient, or no measurable decrease (float64 noise floor)
        progress = (fa - new_f) > 1e-15 * fa.abs().clamp_min(1.0)
        still = moved & progress & (new_g.abs().amax(1) > tol)
        active[idx] = still
    log.debug("batched logreg: %d L-BFGS iterations for %d episodes (max |grad| %.1e)", it + 1, E,
              float(g.abs().amax()))
    T = theta.view(E, n_classes, k + 1)
    return T[..., :k] @ Q.transpose(1, 2), T[..., k]


@READOUTS.register("logreg_batched")
class LogRegBatchedReadout(Readout):
    """RFS logistic regression: scikit-learn's objective solved for all episodes at once (batched L-BFGS, float64)."""

    config_cls = LogRegConfig
    probabilistic = True

    def uses_images(self) -> bool:
        return self.config.n_aug_support > 0

    def predict(self, inputs: EpisodeInputs) -> ReadoutOutput:
        chunk = int(self.options.get("chunk", 2000 if self.config.n_aug_support == 0 else 200))
        E, W = inputs.rows.shape[0], inputs.n_way
        device = inputs.device
        correct, probs = [], []
        for s in range(0, E, chunk):
            sup, qry = support_query_features(inputs, self.config.n_aug_support, s, min(E, s + chunk))
            e, _, S, D = sup.shape
            xs = l2_normalize(torch.as_tensor(sup, dtype=torch.float64, device=device)).reshape(e, W * S, D)
            xq = l2_normalize(torch.as_tensor(qry, dtype=torch.float64, device=device)).reshape(e, -1, D)
            ys = torch.arange(W, device=device).repeat_interleave(S).expand(e, -1)
            yq = torch.arange(W, device=device).repeat_interleave(inputs.n_query)
            Wt, b = fit_logreg_batched(xs, ys, W, C=float(self.config.C))
            logits = xq @ Wt.transpose(1, 2) + b[:, None]
            correct.append((logits.argmax(-1) == yq).to(torch.float64).mean(-1).cpu())
            probs.append(torch.softmax(logits, -1).to(torch.float32).cpu())
            inputs.done(e)
        return ReadoutOutput(torch.cat(correct).numpy(), torch.cat(probs).numpy())
