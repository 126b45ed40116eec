"""Linear CKA from the unbiased HSIC estimator, streamed over minibatches (Nguyen, Raghu, Kornblith 2021).

Definitions. For ``n`` examples, a representation is a matrix ``X`` of ``n`` rows (each example's
activations flattened); its linear-kernel Gram matrix is ``K = X X^T``. With ``K~`` and ``L~`` the Gram
matrices with their diagonals set to zero, the unbiased HSIC estimator (Song et al. 2012, the U-statistic
used by Nguyen et al. 2021) is

    HSIC_1(K, L) = [ tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1 ] / (n(n-3)),

defined for ``n >= 4``. It needs no centering of ``X``: adding a constant vector to every example leaves it
unchanged, so it is computed here on the centered Gram matrices ``HKH`` (the same value in exact
arithmetic, far less cancellation in floating point). Linear CKA (Kornblith et al. 2019) is

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Streaming. ``MinibatchCKA`` keeps, for ``R`` representations of the same images, only the running sum of
the ``R x R`` matrix of ``HSIC_1`` over minibatches and the number of minibatches, in float64: its state
does not grow with the number of images. Each minibatch's ``HSIC_1`` is an unbiased estimate of the
population HSIC of the two representations (the expectation over the image distribution), whatever the
minibatch size, so the mean over ``k`` minibatches is also unbiased, with variance falling as ``1/k``.
The CKA reported is the CKA of these averages, ``mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) mean
HSIC_1(L, L))``, which is Nguyen et al.'s minibatch CKA. A ratio of unbiased estimates is not itself
unbiased: it is a consistent estimate of the population CKA.

How this departs from Kornblith et al. 2019. They compute linear CKA once on the full set of ``n``
examples with the biased estimator ``HSIC_0 = tr(K H L H) / (n-1)^2`` (``H`` the centering matrix),
which is the same as ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` for centered ``X``, ``Y``. That needs
all ``n`` representations at once (memory grows with ``n``), and its bias (of order ``1/n``, larger for
features wider than ``n``) does not average away over minibatches: a mean of biased minibatch estimates
depends on the minibatch size. The unbiased form has neither problem, so its CKA on minibatches of 4 and
on one minibatch of all images estimate the same quantity. On the same ``n`` images, full-batch biased
CKA and this estimate differ by the biased estimator's bias, which vanishes as ``n`` grows; minibatch CKA
has the variance of ``k`` averaged minibatches instead, larger for small minibatches.

Undefined cases. CKA is 0/0 for a representation whose self-HSIC is zero (constant over the images, e.g.
a block whose outputs are all zero); it is then NaN, as it should be, and never from a small minibatch.
"""
from __future__ import annotations

import torch

__all__ = ["MIN_EXAMPLES", "MinibatchCKA", "cka_from_hsic", "gram", "hsic_matrix", "unbiased_hsic"]

MIN_EXAMPLES = 4   # HSIC_1 divides by n(n-3) and (n-1)(n-2)
GRAM_SLICE = 1 << 24   # float64 values converted at once by ``gram`` (128 MiB)


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X X^T`` of ``x`` (``(n, ...)``, flattened per example), in float64.

    The features are summed in slices so that the float64 copy of a wide activation (an ImageNet ResNet's
    first stage) stays at most ``GRAM_SLICE`` values.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    step = max(1, GRAM_SLICE // max(1, flat.shape[0]))
    out = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], step):
        part = flat[:, start:start + step].to(torch.float64)
        out += part @ part.T
    return out


def _check_n(n: int) -> None:
    if n < MIN_EXAMPLES:
        raise ValueError(f"the unbiased HSIC estimator needs minibatches of at least {MIN_EXAMPLES} examples "
                         f"(it divides by n(n-3)); got {n}")


def hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """``HSIC_1`` between every pair of ``R`` Gram matrices of the same ``n`` examples.

    Args:
        grams: ``(R, n, n)`` symmetric Gram matrices (their diagonals are ignored), float64.

    Returns:
        ``(R, R)`` float64, entry ``(i, j)`` = ``HSIC_1(grams[i], grams[j])`` (see the module docstring).

    Raises:
        ValueError: ``n < 4``, or the matrices are not square.
    """
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must be (R, n, n); got {tuple(grams.shape)}")
    n = grams.shape[1]
    _check_n(n)
    k = grams.to(torch.float64)
    # HSIC_1 is unchanged by centering the features (K -> HKH), which removes the large common part of
    # non-negative activations that would otherwise cancel between the three terms
    k = k - k.mean(dim=1, keepdim=True) - k.mean(dim=2, keepdim=True) + k.mean(dim=(1, 2), keepdim=True)
    k = k * (1.0 - torch.eye(n, dtype=torch.float64, device=grams.device))
    flat = k.reshape(k.shape[0], -1)
    trace = flat @ flat.T                      # tr(K~ L~) = sum of the elementwise product (both symmetric)
    rows = k.sum(dim=2)                        # K~ 1
    total = rows.sum(dim=1)                    # 1' K~ 1
    cross = rows @ rows.T                      # 1' K~ L~ 1
    return (trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """``HSIC_1(K, L)`` of two ``(n, n)`` Gram matrices (float64 scalar)."""
    return hsic_matrix(torch.stack([k, l]))[0, 1]


def cka_from_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """CKA between every pair from an ``(R, R)`` HSIC matrix: ``H_ij / sqrt(H_ii H_jj)``.

    Pairs involving a representation with a self-HSIC <= 0 (constant over the images) are NaN.
    """
    self_hsic = torch.diagonal(hsic)
    norm = torch.sqrt(torch.outer(self_hsic, self_hsic))
    defined = torch.outer(self_hsic > 0, self_hsic > 0)
    return torch.where(defined, hsic / torch.where(defined, norm, torch.ones_like(norm)),
                       torch.full_like(hsic, float("nan")))


class MinibatchCKA:
    """Streamed linear CKA between ``R`` representations of the same images (see the module docstring).

    ``update`` takes one minibatch: the ``R`` Gram matrices of its ``n >= 4`` examples (or the ``R``
    representations themselves). The state is the ``(R, R)`` sum of ``HSIC_1`` and the count of
    minibatches, whatever the number of images.

    Args:
        n_representations: ``R``.
        device: where the running sum lives (that of the Gram matrices passed to ``update``).
    """

    def __init__(self, n_representations: int, device: torch.device | str | None = None):
        if n_representations < 1:
            raise ValueError(f"n_representations must be positive; got {n_representations}")
        self.hsic_sum = torch.zeros(n_representations, n_representations, dtype=torch.float64, device=device)
        self.minibatches = 0
        self.examples = 0

    def update(self, grams: torch.Tensor | list[torch.Tensor]) -> None:
        """Add one minibatch: ``(R, n, n)`` Gram matrices, or a list of ``R`` representations ``(n, ...)``.

        Raises:
            ValueError: a minibatch of fewer than 4 examples, or not ``R`` representations.
        """
        if isinstance(grams, (list, tuple)):
            grams = torch.stack([gram(x) for x in grams])
        if grams.shape[0] != self.hsic_sum.shape[0]:
            raise ValueError(f"expected {self.hsic_sum.shape[0]} representations; got {grams.shape[0]}")
        self.hsic_sum += hsic_matrix(grams).to(self.hsic_sum.device)
        self.minibatches += 1
        self.examples += grams.shape[1]

    @property
    def hsic(self) -> torch.Tensor:
        """``(R, R)``: the mean ``HSIC_1`` over the minibatches seen."""
        if not self.minibatches:
            raise ValueError("no minibatch has been added")
        return self.hsic_sum / self.minibatches

    def cka(self) -> torch.Tensor:
        """``(R, R)``: CKA of the minibatch-averaged HSIC (Nguyen et al. 2021), float64."""
        return cka_from_hsic(self.hsic)
