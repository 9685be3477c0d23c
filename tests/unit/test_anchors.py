"""SSD anchor generation against hand-computed MediaPipe SsdAnchorsCalculator values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.modelcard import SsdAnchors
from agent.pipeline.anchors import generate_ssd_anchors

pytestmark = pytest.mark.inference

BLAZEFACE = SsdAnchors(input_size=(128, 128), strides=(8, 16, 16, 16))


def test_blazeface_short_range_has_896_anchors() -> None:
    anchors = generate_ssd_anchors(BLAZEFACE)
    assert anchors.shape == (896, 4)
    assert anchors.dtype == np.float32


def test_blazeface_first_and_last_anchors() -> None:
    anchors = generate_ssd_anchors(BLAZEFACE)
    # Stride 8: a 16x16 map, two anchors per location (aspect 1 plus the interpolated one).
    np.testing.assert_allclose(anchors[0], [4 / 128, 4 / 128, 1, 1])
    np.testing.assert_allclose(anchors[1], [4 / 128, 4 / 128, 1, 1])
    np.testing.assert_allclose(anchors[2], [12 / 128, 4 / 128, 1, 1])
    np.testing.assert_allclose(anchors[32], [4 / 128, 12 / 128, 1, 1])  # second row
    np.testing.assert_allclose(anchors[511], [124 / 128, 124 / 128, 1, 1])
    # Strides 16 merged: an 8x8 map, six anchors per location.
    for i in range(512, 518):
        np.testing.assert_allclose(anchors[i], [8 / 128, 8 / 128, 1, 1])
    np.testing.assert_allclose(anchors[518], [24 / 128, 8 / 128, 1, 1])
    np.testing.assert_allclose(anchors[-1], [120 / 128, 120 / 128, 1, 1])


def test_anchor_sizes_follow_layer_scales_when_not_fixed() -> None:
    options = SsdAnchors(
        input_size=(64, 32),
        strides=(16, 32),
        min_scale=0.2,
        max_scale=0.8,
        aspect_ratios=(1.0, 4.0),
        fixed_anchor_size=False,
    )
    anchors = generate_ssd_anchors(options)
    # Layer 0: 4x2 map (width 64/16, height 32/16), 3 anchors per location; layer 1: 2x1, 3.
    assert anchors.shape == (4 * 2 * 3 + 2 * 1 * 3, 4)
    s0, s1 = 0.2, 0.8
    np.testing.assert_allclose(anchors[0], [0.5 / 4, 0.5 / 2, s0, s0], rtol=1e-6)
    np.testing.assert_allclose(anchors[1], [0.5 / 4, 0.5 / 2, s0 * 2, s0 / 2], rtol=1e-6)
    interpolated = math.sqrt(s0 * s1)
    np.testing.assert_allclose(anchors[2, 2:], [interpolated, interpolated], rtol=1e-6)
    # The last layer interpolates towards a scale of 1.0.
    last = math.sqrt(s1 * 1.0)
    np.testing.assert_allclose(anchors[-1], [1.5 / 2, 0.5, last, last], rtol=1e-6)


def test_reduced_lowest_layer_uses_the_predefined_three_boxes() -> None:
    options = SsdAnchors(
        input_size=(8, 8),
        strides=(8, 8),
        min_scale=0.2,
        max_scale=0.6,
        reduce_boxes_in_lowest_layer=True,
        fixed_anchor_size=False,
    )
    anchors = generate_ssd_anchors(options)
    # One location; layer 0 gives 3 predefined boxes, layer 1 (same stride) 1 + interpolated.
    assert anchors.shape == (5, 4)
    np.testing.assert_allclose(anchors[0, 2:], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(anchors[1, 2:], [0.2 * math.sqrt(2), 0.2 / math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(anchors[2, 2:], [0.2 / math.sqrt(2), 0.2 * math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(anchors[3, 2:], [0.6, 0.6], rtol=1e-6)
    np.testing.assert_allclose(anchors[4, 2:], [math.sqrt(0.6), math.sqrt(0.6)], rtol=1e-6)


def test_single_stride_uses_the_mean_scale_and_ceil_map_size() -> None:
    options = SsdAnchors(
        input_size=(20, 10),
        strides=(8,),
        min_scale=0.2,
        max_scale=0.6,
        interpolated_scale_aspect_ratio=0.0,
        fixed_anchor_size=False,
    )
    anchors = generate_ssd_anchors(options)
    assert anchors.shape == (3 * 2, 4)  # ceil(20/8) x ceil(10/8) locations, one anchor each
    np.testing.assert_allclose(anchors[:, 2:], 0.4, rtol=1e-6)
    np.testing.assert_allclose(anchors[1, :2], [1.5 / 3, 0.5 / 2], rtol=1e-6)
