"""SSD anchors, generated exactly as MediaPipe's SsdAnchorsCalculator does.

Layers that share a stride are merged into one feature map (their anchors interleaved per
location), each layer contributes one anchor per aspect ratio plus, when
``interpolated_scale_aspect_ratio > 0``, one anchor at the geometric mean of its scale and the
next layer's. Centres are ``(x + offset_x) / feature_map_width`` (likewise for y), normalised to
the model input; with ``fixed_anchor_size`` every anchor is 1 x 1 (the regressors then carry the
absolute size), as BlazeFace uses. Feature map sizes are ``ceil(input / stride)``.

For BlazeFace short range (128 x 128, strides 8, 16, 16, 16) this gives 16*16*2 + 8*8*6 = 896
anchors, the first centred at (4/128, 4/128).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from agent.modelcard import SsdAnchors

__all__ = ["generate_ssd_anchors"]


def _layer_scale(options: SsdAnchors, index: int) -> float:
    count = len(options.strides)
    if count == 1:
        return (options.min_scale + options.max_scale) * 0.5
    return options.min_scale + (options.max_scale - options.min_scale) * index / (count - 1.0)


def generate_ssd_anchors(options: SsdAnchors) -> npt.NDArray[np.float32]:
    """Anchors as an ``(N, 4)`` float32 array of ``[x_center, y_center, w, h]``, normalised."""
    in_w, in_h = options.input_size
    strides = options.strides
    blocks: list[npt.NDArray[np.float64]] = []
    layer = 0
    while layer < len(strides):
        ratios: list[float] = []
        scales: list[float] = []
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = _layer_scale(options, last)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(options.aspect_ratios)
                scales += [scale] * len(options.aspect_ratios)
                if options.interpolated_scale_aspect_ratio > 0.0:
                    following = 1.0 if last == len(strides) - 1 else _layer_scale(options, last + 1)
                    scales.append(math.sqrt(scale * following))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        if options.fixed_anchor_size:
            widths = np.ones(len(ratios))
            heights = np.ones(len(ratios))
        else:
            roots = np.sqrt(np.asarray(ratios, dtype=np.float64))
            widths = np.asarray(scales) * roots
            heights = np.asarray(scales) / roots
        map_w = math.ceil(in_w / strides[layer])
        map_h = math.ceil(in_h / strides[layer])
        # Row-major over (y, x, anchor): the order the model's regressor rows come in.
        ys, xs, ids = np.meshgrid(
            np.arange(map_h), np.arange(map_w), np.arange(len(ratios)), indexing="ij"
        )
        block = np.stack(
            [
                (xs + options.anchor_offset[0]) / map_w,
                (ys + options.anchor_offset[1]) / map_h,
                widths[ids],
                heights[ids],
            ],
            axis=-1,
        ).reshape(-1, 4)
        blocks.append(block)
        layer = last
    return np.concatenate(blocks).astype(np.float32)
