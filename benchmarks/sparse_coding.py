"""Sparse coding of natural image patches: dictionary learning with spread codes vs scikit-learn.

Learns a dictionary ``B`` (256 pixels x ``--atoms`` atoms, unit-norm columns) for 16x16 patches of the two
photographs bundled with scikit-learn (``load_sample_images()``: china.jpg, flower.jpg), by minimising the
sparse-coding objective over the patches ``x``

    sum_x  0.5*||x - B a_x||^2 + lam*||a_x||_1

(the objective of ``sklearn.decomposition.MiniBatchDictionaryLearning`` with ``alpha=lam``), alternating over
mini-batches: scikit-learn's are 256 patches (its default ``batch_size``); spread's (``--spread-batch-size``,
default 1024) are 4 of them joined, so both see the same patches in the same order.

* codes: the codes of the batch, ``A`` (atoms x batch), are a ``torch.nn.Parameter`` handed to
  ``SpreadOptimizer(base=torch.optim.LBFGS, kappa=lam/2, zero_threshold=1e-3)`` (spread's penalty
  ``2*kappa*|A|_1`` is the L1 term; the closure is the plain least-squares loss), started at one
  proximal-gradient step from zero, so the factors start aligned with the first gradient and most entries
  start at exact zero. Training codes (default, ``--working-set 32``) are solved on per-patch working sets:
  round 1 takes each patch's 32 atoms most correlated with it (largest ``|B^T x|``), one LBFGS step of
  ``--code-iters 10`` iterations; round 2 (``--code-rounds 8``) checks every atom with one product ``A G - C``
  (``G = B^T B``, ``C = B^T X``) and re-solves on each patch's nonzeros plus the zeros that violate
  ``|g| <= lam`` the most (the outer loop of ``SpreadLasso``'s working sets, at a fixed size so the batch stays
  one ``(batch, 32)`` parameter; closure on the gathered Gram blocks ``G[S, S]``, gradient by hand), started
  at one proximal-gradient step from round 1's codes. About 2.7% above the lasso optimum per batch (measured
  and reported). ``--working-set 0`` is the former coder: one step of ``--code-iters`` LBFGS iterations on all
  atoms, closure on the full Gram matrix. Held-out codes get 10 steps of 10 on all atoms with the plain
  autograd closure (within about 4e-5 of scikit-learn's lasso_cd on the same dictionary; measured and
  reported). One long step rather than several short ones per round: between steps spread snaps and revives
  entries behind LBFGS's back, and with the short line search budgets of a small ``max_iter`` that was seen
  to stall LBFGS.
* dictionary: ``B`` is a plain parameter updated by ``torch.optim.LBFGS`` (``--dict-iters 5`` iterations per
  batch) on the running least-squares surrogate ``0.5*tr(D^T D S_AA) - tr(D^T S_XA)`` of all patches seen so
  far, with ``D = B / column norms`` (the statistics ``S_AA = E[a a^T]``, ``S_XA = E[x a^T]`` with the
  forgetting schedule of Mairal et al. 2009, which MiniBatchDictionaryLearning keeps too); the columns of ``B``
  are projected to unit norm after each step. Evaluating the surrogate at unit-norm columns matters: LBFGS on
  the raw surrogate followed by the projection gave a worse dictionary. (Its gradient is written by hand:
  ``dD = D S_AA - S_XA``, projected onto each column's tangent and divided by the column norm.) LBFGS runs on
  ``B`` with column ``j`` rescaled to ``sqrt(S_AA[j, j])`` (relative), a free Jacobi preconditioner. Atoms no
  patch uses are redrawn from the batch before the step, as scikit-learn does. ``--dict-update adam`` instead
  takes one Adam step per batch on the batch's own loss (kept for comparison: about 2.5% worse).

What changed in this version (held-out objective after 3 passes; the trajectory noise between batch orders and
settings is about +-0.0003, several times the effect of most settings below, so each was run on seeds 0-2):

* batches of 1024 for spread: the coder's cost is mostly per-operation overhead, so 4x the patches per call
  cost about 2x the time (3 passes: about 10 s instead of 18-20 s) at about the same quality per pass (seed 0:
  0.23874-0.23885 against 0.23858 with batches of 256). scikit-learn with batches of 1024 is slower and worse
  (29.6 s, 0.23854 after 3 passes, against 25.5 s and 0.23811 with its default 256): 256 is its better
  setting, and the comparison keeps it.
* round 2 starts at a proximal-gradient step from round 1's codes instead of at round 1's codes: a zero of the
  new set that violates its condition then starts off the saddle ``U = W = 0``, where its factors cannot move
  until the zero pass at the end of the round's one LBFGS step. Per batch the codes get closer to the optimum
  (objective gap 2.95e-2 -> 2.76e-2 for 10 + 8 iterations, 1.08e-2 -> 8.3e-3 for 10 + 10 + 10, 1024 patches
  of a mid-training dictionary); the dictionary's gain is within the noise.
* the Gram-block closure as a batch of ``(1 x 32) @ (32 x 32)`` products (2-3x faster than the broadcast product).
* not kept: ``zero_threshold=1e-2`` for the codes (snaps spurious small codes sooner): 0.23842 instead of
  0.23885 on seed 0, but 0.24085 instead of 0.24054 on seed 1 and 0.24187 instead of 0.24183 on seed 2.

Measured and not kept (same machine, spread-only runs of a copy of this loop with lasso_cd held-out codes;
differences of ~0.0003 are within the trajectory noise): a third working-set round (more accurate codes, more time,
no better); Adam or Rprop as the coder's base (per iteration cheaper, objective gap 1e-3 after 60 iterations, but a
worse dictionary: 0.23874-0.23918 on seed 0); a per-row Barzilai-Borwein base (no faster than LBFGS per iteration);
codes warm-started from the patch's codes of the previous pass (0.23884 / 0.24055 on seeds 0 / 1: no change); 20
dictionary iterations per batch (0.23932 / 0.24065: worse). With exact training codes (lasso_cd,
``--oracle-codes``) the dictionary rule matters: at batches of 1024 LBFGS with 5 iterations ends 3 passes at
0.23884, with 20 iterations at 0.23838, scikit-learn's block-coordinate step at 0.23854, and LBFGS preconditioned
by the Cholesky factor of ``S_AA`` (3 iterations) at 0.23829; with spread's inexact codes that preconditioned step
is no better (0.23882) and costs more, so it is not used. Spread + LBFGS converges slowly in the codes themselves:
on the optimal working sets, 10 / 20 / 40 iterations leave them 31% / 12% / 6% (relative Frobenius) from the lasso
optimum, against 0.1% for lasso_cd at its default tolerance.

Patches: grayscale, whitened as in Olshausen & Field (1997) (the image spectrum is flattened by ``|f|`` with a
low-pass roll-off ``exp(-(|f|/f0)^4)``, ``f0 = 0.2`` cycles/pixel, which keeps JPEG block noise out),
scaled to unit pixel variance, patch mean removed, and scaled so that the mean squared patch norm is 1.
Training patches come from the top 80% of each photograph, held-out patches from the bottom 20%.

Compared against ``MiniBatchDictionaryLearning`` (``fit_algorithm="cd"``, ``transform_algorithm="lasso_cd"``,
float64: its fastest path here; ``--sklearn-algorithm lars`` for LARS; the same initial dictionary, the same
mini-batches in the same order through ``partial_fit``, which is the loop ``fit`` runs minus its early
stopping) at ``alpha = lam`` (the same objective) and at a slightly smaller and larger alpha, so that its error
can be read at spread's sparsity (linear interpolation). With the same alpha, the held-out lasso objective
``0.5*||x - B a||^2 + lam*|a|_1`` per patch compares the two directly; the checkpoints say when each method
reaches the other's final value.
Reported: held-out relative squared error ``sum ||x - B a||^2 / sum ||x||^2`` with codes inferred by each
method's own coder (spread: the same spread-LBFGS coder run longer; scikit-learn: ``transform``), code
sparsity (mean nonzeros per patch, fraction of exact zeros), training wall time, held-out coding time.

    python benchmarks/sparse_coding.py            # default size (about 2.5 minutes on 2 CPU cores)
    python benchmarks/sparse_coding.py --quick    # smoke run (about 15 s, mostly imports)

Both methods run on one thread (``--threads``); the timings exclude the held-out evaluations at the checkpoints.

Writes ``benchmarks/results/sparse_coding.json``, ``sparse_coding_atoms.png`` (spread's atoms, most used first),
``sparse_coding_atoms_sklearn.png`` (scikit-learn's at ``alpha = lam``) and ``sparse_coding_curve.png``
(held-out error and objective against training time) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from spread_optim import SpreadOptimizer

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------------------
# data


def whiten_image(image: np.ndarray, f0: float = 0.2, margin: int = 16) -> np.ndarray:
    """Olshausen & Field's whitening filter ``|f| * exp(-(|f|/f0)^4)`` (f in cycles/pixel), borders cut."""
    image = image - image.mean()
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.fftfreq(image.shape[1])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    out = np.real(np.fft.ifft2(np.fft.fft2(image) * f * np.exp(-((f / f0) ** 4))))
    return out[margin:-margin, margin:-margin]  # the FFT wraps around: drop the borders


def load_patches(n_train: int, n_test: int, size: int = 16, seed: int = 0,
                 f0: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Whitened grayscale patches (rows), float64: training from the top 80% of each photograph, held-out
    from the bottom 20%."""
    from sklearn.datasets import load_sample_images
    from sklearn.feature_extraction.image import extract_patches_2d

    rng_train, rng_test = np.random.RandomState(seed), np.random.RandomState(seed + 1)  # held-out set: whatever n_train
    images = [whiten_image(im.astype(np.float64).mean(axis=2) / 255.0, f0) for im in load_sample_images().images]
    scale = np.sqrt(np.mean([im.var() for im in images]))
    train, test = [], []
    for i, im in enumerate(images):
        im = im / scale
        cut = int(0.8 * im.shape[0])
        share_train = n_train // len(images) + (i < n_train % len(images))
        share_test = n_test // len(images) + (i < n_test % len(images))
        train.append(extract_patches_2d(im[:cut], (size, size), max_patches=share_train, random_state=rng_train))
        test.append(extract_patches_2d(im[cut:], (size, size), max_patches=share_test, random_state=rng_test))
    X_train = np.concatenate(train).reshape(n_train, size * size)
    X_test = np.concatenate(test).reshape(n_test, size * size)
    X_train -= X_train.mean(axis=1, keepdims=True)
    X_test -= X_test.mean(axis=1, keepdims=True)
    norm = np.sqrt((X_train**2).sum(axis=1).mean())
    return X_train / norm, X_test / norm


# ----------------------------------------------------------------------------------------------------
# spread


def soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    """``sign(z)*max(|z| - t, 0)``: with ``z = A - g/L`` and ``t = lam/L``, one proximal-gradient step of the lasso
    (the coders' starting points; most entries land at exact zero)."""
    return torch.sign(z) * (z.abs() - t).clamp(min=0)


def spread_codes(X: torch.Tensor, B: torch.Tensor, lam: float, steps: int, max_iter: int,
                 zero_threshold: float) -> torch.Tensor:
    """Lasso codes ``argmin_A 0.5*||X - B A||^2 + lam*|A|_1`` (X: pixels x patches) by spread + LBFGS."""
    B = B.detach()
    lipschitz = float(torch.linalg.matrix_norm(B, 2)) ** 2
    z = B.T @ X / lipschitz  # one proximal-gradient step from A = 0: a start aligned with the first gradient
    A = torch.nn.Parameter(soft_threshold(z, lam / lipschitz))
    optimizer = SpreadOptimizer([A], torch.optim.LBFGS, kappa=lam / 2, lr=1, max_iter=max_iter, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
                                zero_threshold=zero_threshold)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (X - B @ A).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return A.detach()


def spread_train_codes(X: torch.Tensor, B: torch.Tensor, lam: float, max_iter: int, zero_threshold: float,
                       power: torch.Tensor) -> torch.Tensor:
    """The training codes of one mini-batch: the same lasso and the same spread + LBFGS coder as
    :func:`spread_codes` (one step of ``max_iter`` iterations), evaluated through the Gram matrix.

    ``0.5*||X - B A||^2 = 0.5*||X||^2 + 0.5*<A, G A> - <A, C>`` with ``G = B^T B`` and ``C = B^T X`` computed
    once per batch, so each closure evaluation is one (atoms x atoms) @ (atoms x batch) product and the
    gradient ``G A - C`` is written by hand (no autograd graph): three matrix products and an autograd pass
    fewer per evaluation (scikit-learn's coordinate descent also works on the Gram matrix). ``||B||_2^2``
    (the step of the proximal-gradient start) is the Rayleigh quotient of a few power iterations on ``G``,
    warm-started from the previous batch's vector ``power`` (updated in place): the dictionary moves little
    between batches, and the start only needs a step near ``1/||B||_2^2``."""
    with torch.no_grad():
        G = B.T @ B
        C = B.T @ X
        v = power
        for _ in range(4):
            v = G @ v
            v /= v.norm()
        power.copy_(v)
        lipschitz = float(v @ (G @ v))
        half_xx = 0.5 * float(X.pow(2).sum(dtype=torch.float64))
        z = C / lipschitz
        A = torch.nn.Parameter(soft_threshold(z, lam / lipschitz))
    optimizer = SpreadOptimizer([A], torch.optim.LBFGS, kappa=lam / 2, lr=1, max_iter=max_iter, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
                                zero_threshold=zero_threshold)

    @torch.no_grad()
    def closure():
        GA = G @ A
        A.grad = GA - C
        return half_xx + (A * (0.5 * GA - C)).sum(dtype=torch.float64)

    optimizer.step(closure)
    return A.detach()


def spread_working_set_codes(X: torch.Tensor, B: torch.Tensor, lam: float, size: int, iters: tuple[int, ...],
                             zero_threshold: float, power: torch.Tensor) -> torch.Tensor:
    """The training codes of one mini-batch on per-patch working sets: the same lasso, solved by spread + LBFGS
    on ``size`` atoms per patch instead of all of them.

    Round 1: each patch's ``size`` atoms most correlated with it (largest ``|B^T x|``), started at the
    proximal-gradient step from zero as :func:`spread_codes`. Each later round: one product ``A G - C`` checks
    every atom of every patch, and the set becomes the patch's nonzeros plus the zeros that violate their
    optimality condition ``|g| <= lam`` the most (the outer loop of :class:`spread_optim.SpreadLasso`'s working
    sets, with a fixed size so that all patches stay one tensor), started at one proximal-gradient step from the
    previous round's codes (a zero of the set that violates its condition then starts off the saddle, where its
    factors could not move during the round).
    The codes of all patches are one ``(batch, size)`` parameter handed to one
    ``SpreadOptimizer(LBFGS, kappa=lam/2)`` per round (one step of ``iters[round]`` iterations); the closure
    uses the patches' Gram blocks ``G[S, S]`` (``(batch, size, size)``, gathered once per round) and
    ``C[S] = B[:, S]^T x``, with the gradient written by hand. An entry outside the set is held at zero for the
    round. Per evaluation this touches ``batch*size`` code entries instead of ``batch*atoms``: with ``size = 32``
    of 256 atoms, spread's bookkeeping and LBFGS's history work on 8x smaller vectors."""
    with torch.no_grad():
        G = B.T @ B
        C = (B.T @ X).T.contiguous()  # batch x atoms
        v = power  # ||B||_2^2 by warm power iterations, as in spread_train_codes
        for _ in range(4):
            v = G @ v
            v /= v.norm()
        power.copy_(v)
        lipschitz = float(v @ (G @ v))
        n, k = C.shape
        size = min(size, k)
        score, A = C.abs(), None
    for r, max_iter in enumerate(iters):
        with torch.no_grad():
            if A is not None:
                g = A @ G - C
                score = torch.where(A != 0, torch.full_like(g, float("inf")), g.abs())
            idx = torch.topk(score, size, dim=1).indices  # batch x size
            Gw = G[idx[:, :, None], idx[:, None, :]]
            Cw = torch.gather(C, 1, idx)
            # every round starts at one proximal-gradient step from the previous round's codes (from zero in
            # round 1): the set's zeros that violate their condition start off the saddle U = W = 0, where
            # spread's factors cannot move before the zero pass at the end of the round's one LBFGS step
            z = torch.gather(A - g / lipschitz, 1, idx) if A is not None else Cw / lipschitz
            P0 = soft_threshold(z, lam / lipschitz)
        P = torch.nn.Parameter(P0)
        optimizer = SpreadOptimizer([P], torch.optim.LBFGS, kappa=lam / 2, lr=1, max_iter=max_iter, history_size=10,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
                                    zero_threshold=zero_threshold)

        @torch.no_grad()
        def closure():
            # P G[S, S] as a batch of (1 x size) @ (size x size) products (G[S, S] is symmetric): on one CPU
            # thread 2-3x faster than the broadcast product (Gw * P.unsqueeze(1)).sum(2), 6x faster than bmm(Gw, P)
            GP = torch.bmm(P.unsqueeze(1), Gw).squeeze(1)
            P.grad = GP - Cw
            return (P * (0.5 * GP - Cw)).sum(dtype=torch.float64)  # the loss up to the constant 0.5*||X||^2

        optimizer.step(closure)
        A = torch.zeros(n, k).scatter_(1, idx, P.detach())
    return A.T.contiguous()


class SpreadDictionary:
    """Online dictionary learning: spread codes per mini-batch, LBFGS (or Adam) on the dictionary."""

    def __init__(self, B0: np.ndarray, lam: float, code_steps: int, code_iters: int, zero_threshold: float,
                 dict_update: str = "lbfgs", dict_iters: int = 10, adam_lr: float = 1e-3, seed: int = 0,
                 working_set: int = 32, code_rounds: tuple[int, ...] = (8,), oracle_codes: bool = False):
        self.B = torch.nn.Parameter(torch.tensor(np.ascontiguousarray(B0.T), dtype=torch.float32))  # pixels x atoms
        self.lam, self.code_steps, self.code_iters, self.zero_threshold = lam, code_steps, code_iters, zero_threshold
        self.working_set, self.code_rounds = working_set, tuple(code_rounds)
        self.dict_update, self.dict_iters = dict_update, dict_iters
        d, k = self.B.shape
        self.S_AA, self.S_XA = torch.zeros(k, k), torch.zeros(d, k)
        self.adam = torch.optim.Adam([self.B], lr=adam_lr) if dict_update == "adam" else None
        self.generator = torch.Generator().manual_seed(seed)
        self.random_state = np.random.RandomState(seed)  # for --dict-update bcd (scikit-learn's redraws)
        self.oracle_codes = oracle_codes
        self.power = torch.ones(k) / k**0.5  # power-iteration vector for ||B||_2 (warm from batch to batch)
        self.step_count = 0

    def partial_fit(self, X_batch: np.ndarray) -> torch.Tensor:
        X = torch.from_numpy(np.ascontiguousarray(X_batch.T, dtype=np.float32))  # pixels x batch
        if self.oracle_codes:  # diagnostic only (not spread): exact lasso codes by scikit-learn's lasso_cd
            D = self.B.detach().T.double().numpy()
            A = torch.from_numpy(sklearn_transform(D, np.asarray(X_batch, dtype=np.float64), self.lam).T.astype(np.float32))
        elif self.code_steps == 1 and self.working_set > 0:
            A = spread_working_set_codes(X, self.B.detach(), self.lam, self.working_set,
                                         (self.code_iters, *self.code_rounds), self.zero_threshold, self.power)
        elif self.code_steps == 1:
            A = spread_train_codes(X, self.B.detach(), self.lam, self.code_iters, self.zero_threshold, self.power)
        else:
            A = spread_codes(X, self.B, self.lam, self.code_steps, self.code_iters, self.zero_threshold)
        n = X.shape[1]
        if self.dict_update == "adam":
            self.adam.zero_grad()
            loss = 0.5 * (X - self.B @ A).pow(2).sum() / n
            loss.backward()
            self.adam.step()
        else:
            # running sufficient statistics with the forgetting schedule of Mairal et al. (and scikit-learn)
            t = self.step_count
            theta = (t + 1) * n if t < n - 1 else n**2 + t + 1 - n
            beta = (theta + 1 - n) / (theta + 1)
            self.S_AA.mul_(beta).add_(A @ A.T, alpha=1 / n)
            self.S_XA.mul_(beta).add_(X @ A.T, alpha=1 / n)
            S_AA, S_XA = self.S_AA, self.S_XA
            if self.dict_update == "bcd":
                # diagnostic only (not the rule): scikit-learn's own dictionary step on the same statistics,
                # one block-coordinate sweep over the atoms, each projected on the unit ball, unused atoms redrawn
                from sklearn.decomposition._dict_learning import _update_dict

                D = self.B.detach().T.double().numpy().copy()  # atoms x pixels, as scikit-learn holds it
                _update_dict(D, X.T.double().numpy(), A.T.double().numpy().copy(), S_AA.double().numpy(),
                             S_XA.double().numpy(), random_state=self.random_state)
                with torch.no_grad():
                    self.B.copy_(torch.from_numpy(D.T))
                self.step_count += 1
                return A
            with torch.no_grad():  # as scikit-learn: redraw atoms that (almost) no patch uses from the batch
                unused = torch.diagonal(S_AA) <= 1e-6
                if bool(unused.any()):
                    pick = X[:, torch.randint(n, (int(unused.sum()),), generator=self.generator)]
                    self.B[:, unused] = pick + 0.01 * pick.std() * torch.randn(pick.shape, generator=self.generator)
                    self.B /= self.B.norm(dim=0, keepdim=True)
                # The surrogate depends on the directions of B's columns only, so their lengths are free:
                # LBFGS runs on B with column j scaled to sqrt(S_AA[j, j]) (relative), which evens out the
                # curvature ~S_AA[j, j] between busy and rarely used atoms (Jacobi preconditioning).
                scale = torch.diagonal(S_AA).clamp(min=1e-6).sqrt()
                B = torch.nn.Parameter(self.B.detach() * (scale / scale.mean()))
            lbfgs = torch.optim.LBFGS([B], lr=1, max_iter=self.dict_iters, history_size=10,
                                      line_search_fn="strong_wolfe")

            @torch.no_grad()
            def closure():
                # the surrogate over unit-norm atoms D = B / norms, 0.5*<D, D S_AA> - <D, S_XA>, and its
                # gradient by hand: dD = D S_AA - S_XA, dB = (dD - D * diag(D^T dD)) / norms (one product)
                norms = B.norm(dim=0, keepdim=True)
                unit = B / norms
                DS = unit @ S_AA
                dD = DS - S_XA
                B.grad = (dD - unit * (unit * dD).sum(0, keepdim=True)) / norms
                return (unit * (0.5 * DS - S_XA)).sum()

            lbfgs.step(closure)
            with torch.no_grad():
                self.B.copy_(B)
        with torch.no_grad():
            self.B /= self.B.norm(dim=0, keepdim=True).clamp(min=1e-12)  # project the atoms to unit norm
        self.step_count += 1
        return A

    def transform(self, X: np.ndarray, steps: int, max_iter: int) -> np.ndarray:
        X = torch.from_numpy(np.ascontiguousarray(X.T, dtype=np.float32))
        A = spread_codes(X, self.B, self.lam, steps, max_iter, self.zero_threshold)
        return A.T.double().numpy()

    @property
    def components_(self) -> np.ndarray:
        return self.B.detach().T.double().numpy()


def joined_batches(schedule: list[np.ndarray], join: int) -> list[np.ndarray]:
    """Spread's mini-batches: ``join`` consecutive ones of each pass of ``schedule`` (passes x batches x patches
    indices) concatenated, so that both methods see the same patches in the same order (the last of a pass may
    be shorter)."""
    return [np.concatenate(epoch[j: j + join]) for epoch in schedule for j in range(0, len(epoch), join)]


# ----------------------------------------------------------------------------------------------------
# measuring


def code_stats(X: np.ndarray, codes: np.ndarray, D: np.ndarray, lam: float) -> dict:
    residual = X - codes @ D
    return dict(
        rel_error=float((residual**2).sum() / (X**2).sum()),
        nnz_per_patch=float((codes != 0).sum(axis=1).mean()),
        zero_fraction=float((codes == 0).mean()),
        objective_per_patch=float((0.5 * (residual**2).sum() + lam * np.abs(codes).sum()) / len(X)),
    )


def sklearn_transform(D: np.ndarray, X: np.ndarray, alpha: float) -> np.ndarray:
    from sklearn.decomposition import sparse_encode

    return sparse_encode(X, D, algorithm="lasso_cd", alpha=alpha, max_iter=5000)


def save_atoms(D: np.ndarray, usage: np.ndarray, path: Path, title: str) -> None:
    """All atoms as a grid of tiles (most used first), each scaled to its own max |value| (grey = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, size = D.shape[0], int(round(np.sqrt(D.shape[1])))
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    pad = 2
    mosaic = np.ones((rows * (size + pad) + pad, cols * (size + pad) + pad))  # white frame between tiles
    for slot, atom in enumerate(np.argsort(-usage, kind="stable")):
        tile = D[atom].reshape(size, size) / (2 * (np.abs(D[atom]).max() or 1.0)) + 0.5
        r, c = divmod(slot, cols)
        top, left = pad + r * (size + pad), pad + c * (size + pad)
        mosaic[top: top + size, left: left + size] = tile
    fig, ax = plt.subplots(figsize=(7.5, 7.5 * rows / cols + 0.4))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curve(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("rel_error", "objective_per_patch"),
                              ("held-out relative squared error", "held-out lasso objective per patch")):
        for name, points in curves.items():
            ax.plot([p["seconds"] for p in points], [p[key] for p in points], "o-", label=name)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def time_to_reach(curve: list[dict], target: float, key: str = "objective_per_patch") -> float | None:
    """Training seconds at which a checkpointed curve first gets to ``target`` (linear between checkpoints)."""
    previous = None
    for point in curve:
        if point[key] <= target:
            if previous is None:
                return point["seconds"]
            frac = (previous[key] - target) / (previous[key] - point[key])
            return previous["seconds"] + frac * (point["seconds"] - previous["seconds"])
        previous = point
    return None


def interpolate_at(nnz: float, rows: list[dict], key: str) -> float | None:
    """Linear interpolation of ``key`` at sparsity ``nnz`` between the two bracketing rows (None outside)."""
    pts = sorted((r["nnz_per_patch"], r[key]) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= nnz <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (nnz - x0) / (x1 - x0)
    return None


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few patches, one short pass")
    parser.add_argument("--n-train", type=int, default=40000, help="training patches")
    parser.add_argument("--n-test", type=int, default=1000, help="held-out patches")
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training patches")
    parser.add_argument("--batch-size", type=int, default=256, help="scikit-learn's mini-batch (its default)")
    parser.add_argument("--spread-batch-size", type=int, default=1024,
                        help="spread's mini-batch: a multiple of --batch-size, so that it is that many of "
                             "scikit-learn's batches, joined (the same patches in the same order)")
    parser.add_argument("--lam", type=float, default=0.15, help="L1 strength (alpha of scikit-learn; spread kappa = lam/2)")
    parser.add_argument("--sklearn-alphas", type=float, nargs="+", default=[0.9, 1.0, 1.1],
                        help="scikit-learn alphas, as multiples of --lam")
    parser.add_argument("--sklearn-algorithm", choices=["cd", "lars"], default="cd",
                        help="MiniBatchDictionaryLearning's fit_algorithm (and lasso_<it> for transform)")
    parser.add_argument("--code-steps", type=int, default=1, help="spread LBFGS steps per mini-batch (codes)")
    parser.add_argument("--code-iters", type=int, default=10,
                        help="LBFGS max_iter per step (training codes; the first working-set round)")
    parser.add_argument("--working-set", type=int, default=32,
                        help="atoms per patch in the training coder's working sets (0: all atoms, one round)")
    parser.add_argument("--code-rounds", type=int, nargs="*", default=[8],
                        help="LBFGS max_iter of each further working-set round (training codes)")
    parser.add_argument("--eval-steps", type=int, default=10, help="spread LBFGS steps for held-out codes")
    parser.add_argument("--eval-iters", type=int, default=10, help="LBFGS max_iter per step (held-out codes)")
    parser.add_argument("--zero-threshold", type=float, default=1e-3, help="spread's zero_threshold for the codes")
    parser.add_argument("--dict-update", choices=["lbfgs", "adam", "bcd"], default="lbfgs",
                        help="dictionary rule; bcd: scikit-learn's block-coordinate sweep (diagnostic, not spread's rule)")
    parser.add_argument("--oracle-codes", action="store_true",
                        help="diagnostic: training codes by lasso_cd instead of spread (isolates the dictionary rule)")
    parser.add_argument("--dict-iters", type=int, default=5, help="LBFGS max_iter per dictionary step")
    parser.add_argument("--adam-lr", type=float, default=1e-3, help="dictionary learning rate with --dict-update adam")
    parser.add_argument("--checkpoints", type=int, default=8, help="held-out evaluations during training (curve)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (both methods)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--f0", type=float, default=0.2, help="whitening roll-off frequency (cycles/pixel)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and the figures")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.checkpoints = 1024, 200, 1, 2
        args.sklearn_alphas, args.spread_batch_size = [1.0], 512
    if args.spread_batch_size % args.batch_size:
        parser.error(f"--spread-batch-size ({args.spread_batch_size}) must be a multiple of "
                     f"--batch-size ({args.batch_size})")

    from sklearn.decomposition import MiniBatchDictionaryLearning
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", module="sklearn")  # lasso_cd convergence chatter on near-zero patches
    lam, bs = args.lam, args.batch_size
    size = 16
    X_train, X_test = load_patches(args.n_train, args.n_test, size, args.seed, args.f0)
    rng = np.random.RandomState(args.seed)
    D0 = X_train[rng.choice(len(X_train), args.atoms, replace=False)]
    D0 = D0 / np.linalg.norm(D0, axis=1, keepdims=True)  # both start from the same random patches
    n_batches = len(X_train) // bs
    schedule = [rng.permutation(len(X_train))[: n_batches * bs].reshape(n_batches, bs) for _ in range(args.epochs)]
    batches = [b for epoch in schedule for b in epoch]  # scikit-learn's mini-batches, in order
    spread_batches = joined_batches(schedule, args.spread_batch_size // bs)
    spread_per_pass = len(spread_batches) // args.epochs

    def checkpoints(count: int) -> set[int]:
        return {round(count * (i + 1) / args.checkpoints) for i in range(args.checkpoints)}

    marks, spread_marks = checkpoints(len(batches)), checkpoints(len(spread_batches))

    # the first torch.optim.Optimizer() of a process imports torch._dynamo (about 2 s, once): not spread's time
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    with threadpool_limits(args.threads):
        # -------- spread
        model = SpreadDictionary(D0, lam, args.code_steps, args.code_iters, args.zero_threshold, args.dict_update,
                                 args.dict_iters, args.adam_lr, args.seed, args.working_set, args.code_rounds,
                                 args.oracle_codes)
        curve, seconds, train_nnz = [], 0.0, []
        bar = tqdm(spread_batches, desc="spread", unit="batch")
        for i, idx in enumerate(bar, 1):
            D_before = model.components_ if i in spread_marks else None
            start = time.perf_counter()
            A = model.partial_fit(X_train[idx])
            seconds += time.perf_counter() - start
            train_nnz.append(float((A != 0).sum(0).float().mean()))
            if i in spread_marks:
                # how far the (cheap) training codes of this batch are from the lasso optimum (lasso_cd)
                X_batch = X_train[idx]
                train_obj = code_stats(X_batch, A.T.double().numpy(), D_before, lam)["objective_per_patch"]
                best = code_stats(X_batch, sklearn_transform(D_before, X_batch, lam), D_before, lam)["objective_per_patch"]
                start = time.perf_counter()
                codes = model.transform(X_test, args.eval_steps, args.eval_iters)
                coding_seconds = time.perf_counter() - start
                stats = code_stats(X_test, codes, model.components_, lam)
                curve.append(dict(batches=i, seconds=seconds, train_codes_objective_gap=(train_obj - best) / best, **stats))
                bar.set_postfix(err=f"{stats['rel_error']:.3f}", nnz=f"{stats['nnz_per_patch']:.1f}")
        bar.close()
        D_spread = model.components_
        # the same dictionary coded by scikit-learn's lasso_cd: how close spread's coder gets to the lasso optimum
        cd_codes = sklearn_transform(D_spread, X_test, lam)
        cd_stats = code_stats(X_test, cd_codes, D_spread, lam)
        spread_row = dict(method="spread", alpha=lam, train_seconds=seconds, test_coding_seconds=coding_seconds,
                          batch_size=args.spread_batch_size,
                          train_nnz_last_epoch=float(np.mean(train_nnz[-spread_per_pass:])),
                          **curve[-1])
        spread_row["train_codes_objective_gap_median"] = float(np.median([p["train_codes_objective_gap"] for p in curve]))
        best = cd_stats["objective_per_patch"]
        spread_row["coder_objective_gap_vs_lasso_cd"] = (spread_row["objective_per_patch"] - best) / best
        spread_usage = (codes != 0).sum(axis=0)

        # -------- scikit-learn
        sk_rows, sk_curve, D_sklearn, sk_usage = [], [], None, None
        for mult in args.sklearn_alphas:
            alpha = mult * lam
            dico = MiniBatchDictionaryLearning(
                n_components=args.atoms, alpha=alpha, batch_size=bs, dict_init=D0.copy(),
                fit_algorithm=args.sklearn_algorithm, transform_algorithm=f"lasso_{args.sklearn_algorithm}",
                transform_alpha=alpha, random_state=args.seed,
            )
            seconds = 0.0
            for i, idx in enumerate(tqdm(batches, desc=f"sklearn alpha={alpha:.3g}", unit="batch"), 1):
                start = time.perf_counter()
                dico.partial_fit(X_train[idx])
                seconds += time.perf_counter() - start
                if i in marks and (mult == 1.0 or i == len(batches)):
                    start = time.perf_counter()
                    codes = dico.transform(X_test)
                    coding_seconds = time.perf_counter() - start
                    stats = code_stats(X_test, codes, dico.components_, alpha)
                    if mult == 1.0:
                        sk_curve.append(dict(batches=i, seconds=seconds, **stats))
            sk_rows.append(dict(method="MiniBatchDictionaryLearning", algorithm=args.sklearn_algorithm, alpha=alpha,
                                batch_size=bs, train_seconds=seconds, test_coding_seconds=coding_seconds, **stats))
            if mult == 1.0:
                D_sklearn, sk_usage = dico.components_.copy(), (codes != 0).sum(axis=0)

    # -------- comparison at equal sparsity and at equal objective
    matched = dict(
        spread_nnz_per_patch=spread_row["nnz_per_patch"],
        spread_rel_error=spread_row["rel_error"],
        spread_seconds=spread_row["train_seconds"],
        sklearn_rel_error_at_spread_nnz=interpolate_at(spread_row["nnz_per_patch"], sk_rows, "rel_error"),
        sklearn_seconds_at_spread_nnz=interpolate_at(spread_row["nnz_per_patch"], sk_rows, "train_seconds"),
    )
    same = [r for r in sk_rows if r["alpha"] == lam]
    if same:  # the same lasso objective: who reaches the other's final held-out objective, and when?
        matched.update(
            spread_objective=spread_row["objective_per_patch"],
            sklearn_objective=same[0]["objective_per_patch"],
            sklearn_seconds=same[0]["train_seconds"],
            spread_seconds_to_sklearn_objective=time_to_reach(curve, same[0]["objective_per_patch"]),
            sklearn_seconds_to_spread_objective=time_to_reach(sk_curve, spread_row["objective_per_patch"]),
        )

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    save_atoms(D_spread, spread_usage, out / "sparse_coding_atoms.png",
               f"spread (codes: SpreadOptimizer + LBFGS, kappa={lam / 2:g}; dictionary: {args.dict_update}): "
               f"{args.atoms} atoms, 16x16, most used first")
    if D_sklearn is not None:
        save_atoms(D_sklearn, sk_usage, out / "sparse_coding_atoms_sklearn.png",
                   f"MiniBatchDictionaryLearning (alpha={lam:g}): {args.atoms} atoms, most used first")
    curves = {"spread": curve}
    if sk_curve:
        curves[f"MiniBatchDictionaryLearning alpha={lam:g}"] = sk_curve
    save_curve(curves, out / "sparse_coding_curve.png",
               f"{args.n_train} patches x {args.epochs} passes, lam={lam:g}, {args.atoms} atoms")

    import sklearn

    result = dict(
        meta=dict(machine=platform.processor() or platform.machine(), python=platform.python_version(),
                  torch=torch.__version__, sklearn=sklearn.__version__, threads=args.threads, quick=args.quick,
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}),
        data=dict(images=["china.jpg", "flower.jpg"], patch=size, n_train=len(X_train), n_test=len(X_test),
                  preprocessing="grayscale, 1/f whitening with exp(-(f/0.2)^4) roll-off, patch mean removed, "
                                "mean squared patch norm 1; train: top 80% of each image, held-out: bottom 20%"),
        rows=[spread_row, *sk_rows],
        spread_codes_by_lasso_cd=cd_stats,
        matched=matched,
        curves=curves,
    )
    (out / "sparse_coding.json").write_text(json.dumps(result, indent=1))

    print(f"\nSparse coding, {len(X_train)} training / {len(X_test)} held-out 16x16 patches, {args.atoms} atoms, "
          f"{args.epochs} passes of {n_batches} mini-batches of {bs} "
          f"(spread: {spread_per_pass} of {args.spread_batch_size}), lam={lam:g}, {args.threads} thread(s), "
          f"{result['meta']['machine']}\n")
    print("| method | alpha | batch | train time (s) | held-out rel. error | nonzeros / patch | exact zeros | "
          "held-out objective / patch | held-out coding time (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        name = r["method"] + (f" ({r['algorithm']})" if "algorithm" in r else "")
        print(f"| {name} | {r['alpha']:.3g} | {r['batch_size']} | {r['train_seconds']:.1f} | {r['rel_error']:.4f} | "
              f"{r['nnz_per_patch']:.2f} | {100 * r['zero_fraction']:.2f}% | {r['objective_per_patch']:.5f} | "
              f"{r['test_coding_seconds']:.2f} |")
    coder = "lasso_cd (--oracle-codes diagnostic)" if args.oracle_codes else (
             f"working sets of {args.working_set} atoms, rounds of up to {', '.join(map(str, [args.code_iters, *args.code_rounds]))} "
             "LBFGS iterations" if args.working_set > 0 and args.code_steps == 1 else
             f"{args.code_steps} step(s) of up to {args.code_iters} LBFGS iterations")
    print(f"\nspread's training codes ({coder} per batch): "
          f"median objective gap to lasso_cd at the checkpoints {spread_row['train_codes_objective_gap_median']:.1e}")
    print(f"spread's held-out codes vs lasso_cd on spread's own dictionary: objective gap "
          f"{spread_row['coder_objective_gap_vs_lasso_cd']:.1e}, lasso_cd: error {cd_stats['rel_error']:.4f} "
          f"at {cd_stats['nnz_per_patch']:.2f} nonzeros/patch")
    if matched["sklearn_rel_error_at_spread_nnz"] is not None:
        print(f"equal sparsity ({matched['spread_nnz_per_patch']:.2f} nonzeros/patch): spread error "
              f"{matched['spread_rel_error']:.4f} in {matched['spread_seconds']:.1f}s, scikit-learn "
              f"{matched['sklearn_rel_error_at_spread_nnz']:.4f} in {matched['sklearn_seconds_at_spread_nnz']:.1f}s "
              "(interpolated between its two nearest alphas)")
    else:
        print("spread's sparsity lies outside the range of scikit-learn's alphas: no comparison at equal sparsity")
    if "sklearn_objective" in matched:
        fmt = lambda t: "not within the run" if t is None else f"after {t:.1f}s"
        print(f"same objective (alpha={lam:g}), held-out objective per patch: spread {matched['spread_objective']:.5f} "
              f"in {matched['spread_seconds']:.1f}s, scikit-learn {matched['sklearn_objective']:.5f} in "
              f"{matched['sklearn_seconds']:.1f}s; spread reaches scikit-learn's final value "
              f"{fmt(matched['spread_seconds_to_sklearn_objective'])}, scikit-learn reaches spread's final value "
              f"{fmt(matched['sklearn_seconds_to_spread_objective'])}")
    return result


if __name__ == "__main__":
    main()
