"""Representational similarity of blocks: linear CKA (Kornblith et al. 2019) from the unbiased HSIC
estimator streamed over minibatches (Nguyen, Raghu, Kornblith 2021), in float64.

``MinibatchCKA`` accumulates the minibatch-averaged ``HSIC_1`` between any number of representations of
the same images (state independent of the number of images); ``hsic_matrix`` / ``unbiased_hsic`` are the
estimator, ``gram`` the linear kernel. ``block_grams`` records the Gram matrices of a network's block
outputs through its anatomy; ``stream_block_cka`` gives the CKA between every pair of blocks of one or
several networks in one pass over the images.
"""
from .blocks import BlockCKA, BlockGrams, block_grams, stream_block_cka
from .cka import MIN_EXAMPLES, MinibatchCKA, cka_from_hsic, gram, hsic_matrix, unbiased_hsic

__all__ = ["BlockCKA", "BlockGrams", "MIN_EXAMPLES", "MinibatchCKA", "block_grams", "cka_from_hsic", "gram",
           "hsic_matrix", "stream_block_cka", "unbiased_hsic"]
