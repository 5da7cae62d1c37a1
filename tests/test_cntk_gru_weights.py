"""CNTK's GRU starts from the specs' initial weights on either device: on a GPU they are packed
into cuDNN's one weight blob. CNTK installs only in its own image, so its module's numpy part is
checked here with the cntk package stubbed out; the image runs the rest."""
from __future__ import annotations


import numpy as np
import pytest

from bench.specs import GRU, GRU_IMDB


def test_the_blob_is_cudnns_layout_as_cntk_reads_it(cntk_module):
    weights = cntk_module.GruWeights.drawn(GRU.embedding, seed=0)
    blob = weights.cudnn_blob()
    stacked = GRU.gates * GRU.units
    # optimized_rnnstack's weights: (gates × (inputs + units + 2), units), CNTK's inferred shape.
    assert blob.shape == (GRU.gates * (GRU.embedding + GRU.units + 2), GRU.units) and blob.dtype == np.float32
    # Read back as CNTK's converter reads a blob: the flat buffer, matrices first, then biases.
    flat = blob.ravel()
    sizes = np.cumsum([stacked * GRU.embedding, stacked * GRU.units, stacked])
    input_kernel, recurrent_kernel, input_bias, recurrent_bias = np.split(flat, sizes)
    assert np.array_equal(input_kernel.reshape(stacked, GRU.embedding), weights.input_kernel)
    assert np.array_equal(recurrent_kernel.reshape(stacked, GRU.units), weights.recurrent_kernel)
    assert np.array_equal(input_bias, weights.input_bias) and np.array_equal(recurrent_bias, weights.recurrent_bias)
    # With the embedding and the dense layer, the task's parameter count.
    dense = GRU.units * GRU_IMDB.num_classes + GRU_IMDB.num_classes
    assert GRU_IMDB.vocabulary * GRU.embedding + blob.size + dense == GRU_IMDB.expected_parameters


def test_the_weights_follow_the_specs_initialisers_from_the_seed(cntk_module):
    weights = cntk_module.GruWeights.drawn(GRU.embedding, seed=0)
    stacked = GRU.gates * GRU.units
    limit = np.sqrt(6.0 / (stacked + GRU.embedding))  # Glorot over the gates' matrices stacked
    assert 0.9 * limit < np.abs(weights.input_kernel).max() <= limit
    assert np.allclose(weights.recurrent_kernel.T @ weights.recurrent_kernel, np.eye(GRU.units), atol=1e-5)
    assert not weights.input_bias.any() and not weights.recurrent_bias.any()
    again, other = cntk_module.GruWeights.drawn(GRU.embedding, seed=0), cntk_module.GruWeights.drawn(GRU.embedding, 1)
    assert np.array_equal(again.cudnn_blob(), weights.cudnn_blob())  # the same in every MPI worker
    assert not np.array_equal(other.input_kernel, weights.input_kernel)
