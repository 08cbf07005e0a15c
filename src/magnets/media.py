"""The media writer: one home for saving and logging a batch of images or clips.

A batch is float in ``[0, 1]``: images ``[B, C, H, W]`` or clips
``[B, C, T, H, W]``. Images become one PNG grid; clips become an animated GIF
of the grid (frame by frame) plus a PNG frame strip (one row per clip, one
column per frame), which is also what TensorBoard shows. Every file is
written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from magnets.files import atomic_write

PAD_VALUE = 0.5  # grey borders between items


def is_video(batch: torch.Tensor) -> bool:
    """True for clips ``[B, C, T, H, W]``, False for images ``[B, C, H, W]``; raises on anything else."""
    if batch.ndim not in (4, 5):
        raise ValueError(f"expected images [B, C, H, W] or clips [B, C, T, H, W], got shape {list(batch.shape)}")
    return batch.ndim == 5


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> one grid ``[3, rows * (H + 2), nrow * (W + 2)]`` (grey replicated to RGB)."""
    return torchvision.utils.make_grid(images.detach().float().cpu(), nrow=nrow, pad_value=PAD_VALUE)


def frame_strip(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``[B, C, T, H, W]`` -> ``[3, B * (H + 2), T * (W + 2)]``: row b holds clip b's frames left to right."""
    b, c, t, h, w = clips.shape
    frames = clips.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, C, H, W], clip-major
    return image_grid(frames, nrow=t)


def grid_frames(clips: torch.Tensor, nrow: int) -> torch.Tensor:
    """Clips ``[B, C, T, H, W]`` -> one grid per frame ``[T, 3, rows * (H + 2), nrow * (W + 2)]``."""
    return torch.stack([image_grid(clips[:, :, k], nrow) for k in range(clips.shape[2])])


def to_uint8_hwc(grid: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in ``[0, 1]`` -> ``[H, W, 3]`` uint8."""
    return grid.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_media(batch: torch.Tensor, stem: str | Path, nrow: int = 8, fps: int = 8) -> list[Path]:
    """Save ``batch`` as files named ``stem`` plus an extension; returns the files written.

    Images: ``<stem>.png``. Clips: ``<stem>.gif`` (the grid, animated at
    ``fps``) and ``<stem>_frames.png`` (the frame strip). ``stem`` is used as
    given, dots included (``grid_w0.5`` gives ``grid_w0.5.png``).
    """
    stem = Path(stem)

    def named(ending: str) -> Path:
        return stem.with_name(stem.name + ending)

    if not is_video(batch):
        png = named(".png")
        return [atomic_write(png, lambda tmp: Image.fromarray(to_uint8_hwc(image_grid(batch, nrow))).save(tmp, format="PNG"))]
    frames = [Image.fromarray(to_uint8_hwc(frame)) for frame in grid_frames(batch, nrow)]
    gif = named(".gif")
    atomic_write(
        gif,
        lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0),
    )
    strip = named("_frames.png")
    atomic_write(strip, lambda tmp: Image.fromarray(to_uint8_hwc(frame_strip(batch))).save(tmp, format="PNG"))
    return [gif, strip]


def log_media(experiment: Any, tag: str, batch: torch.Tensor, step: int, nrow: int = 8) -> None:
    """Log ``batch`` to a TensorBoard ``SummaryWriter`` (``experiment``): an image grid, or a clip's frame strip.

    Does nothing for loggers without images (CSV) or an empty batch.
    """
    if experiment is None or not hasattr(experiment, "add_image") or len(batch) == 0:
        return
    picture = frame_strip(batch) if is_video(batch) else image_grid(batch, nrow)
    experiment.add_image(tag, picture, step)
