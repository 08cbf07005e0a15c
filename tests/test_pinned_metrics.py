"""Behaviour pins for the FID/FVD preprocessing and distance that the rest of the suite left loose (see
tools/mutate.py).

Each test fails on one plausible bug, named in its docstring as the mutant of ``tools/mutate.py`` it kills. The
fixtures break the symmetries the other tests' fixtures have: non-square frames, several channels, frames that
differ in time; the expected values come from an independent computation (a per-pixel loop of TF1's bilinear
rule, a per-frame loop) or by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from magnets.metrics.fid import resize_bilinear_tf1
from magnets.metrics.fvd import I3D_SIZE, I3DTorchScript, resize_frames


def tf1_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres) of one ``[H, W]`` image to
    ``[size, size]``, pixel by pixel: output (i, j) samples the input at (i H / size, j W / size), the neighbours
    past the last row or column clamped to it."""
    h, w = image.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0 = math.floor(y)
        y1, wy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = j * w / size
            x0 = math.floor(x)
            x1, wx = min(x0 + 1, w - 1), x - x0
            top = (1 - wx) * image[y0, x0] + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0] + wx * image[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize(("h", "w", "size"), [(4, 6, 8), (6, 4, 8), (5, 9, 3), (7, 3, 5)])
def test_tf1_resize_of_non_square_images_matches_the_pixel_rule(h: int, w: int, size: int) -> None:
    """Kills ``fid_tf1_resize_axes_swapped`` (the x grid shifted by the height): square test images cannot tell
    height from width. Every channel of a non-square image against TF1's rule computed pixel by pixel."""
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    resized = resize_bilinear_tf1(images, size)  # [2, 3, size, size]
    assert resized.shape == (2, 3, size, size)
    for b in range(2):
        for c in range(3):
            expected = tf1_bilinear(images[b, c].double().numpy(), size)
            np.testing.assert_allclose(resized[b, c].double().numpy(), expected, atol=1e-5, err_msg=f"item {b} channel {c}")


def test_resize_frames_resizes_each_frame_of_each_clip_on_its_own() -> None:
    """Kills ``fvd_frames_not_transposed`` (``[B, C, T, H, W]`` reshaped to frames without moving time before the
    channels): with one channel, or frames that do not change in time, that mix-up is invisible. Three channels,
    every frame different, against resizing each (clip, frame) alone."""
    clips = torch.rand(2, 3, 5, 6, 4, generator=torch.Generator().manual_seed(0))  # [B, C, T, H, W]

    def resize(frames: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)

    out = resize_frames(clips, 3, resize)  # [B, C, T, 3, 3]
    assert out.shape == (2, 3, 5, 3, 3)
    for b in range(2):
        for t in range(5):
            expected = resize(clips[b, :, t][None], 3)[0]  # [C, 3, 3]: frame t of clip b alone
            torch.testing.assert_close(out[b, :, t], expected, msg=f"clip {b} frame {t}")


def test_i3d_input_is_each_frame_quantised_resized_and_scaled() -> None:
    """Kills ``fvd_frames_not_transposed`` through I3D's preprocessing, and checks its pipeline by hand for an RGB
    clip whose frames differ: frame t of clip b is round(255 x), TF1-resized to 224x224, then x / 255 * 2 - 1."""
    clips = torch.rand(1, 3, 9, 5, 7, generator=torch.Generator().manual_seed(1))  # non-square RGB frames, T = 9
    prepared = I3DTorchScript.prepare(clips)  # [1, 3, 9, 224, 224]
    assert prepared.shape == (1, 3, 9, I3D_SIZE, I3D_SIZE)
    for t in (0, 4, 8):
        levels = (clips[:, :, t] * 255).round()  # [1, 3, 5, 7]
        expected = resize_bilinear_tf1(levels, I3D_SIZE).clamp(0, 255) / 255 * 2 - 1
        torch.testing.assert_close(prepared[:, :, t], expected, msg=f"frame {t}")
