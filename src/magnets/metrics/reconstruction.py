"""Reconstruction FID (rFID; rFVD on clips): real items encoded and decoded by a tokenizer, against real statistics.

The tokenizer's reconstructions bound what any model sampling its tokens can
reach: :func:`reconstruction_fid` is the floor of a generated FID measured with
the same extractor and reference. Its value is cached as a small JSON file
(``{"rfid": value, "count": n, ...}``) whose name, built by
:func:`rfid_cache_path`, carries everything the value depends on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from magnets.data.base import to_unit_float
from magnets.files import atomic_write_json
from magnets.metrics.fid import _SAFE_KEY, FeatureAccumulator, FeatureExtractor, FeatureStats, frechet_distance
from magnets.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def rfid_cache_path(
    cache_dir: str | Path, tokenizer_sha: str, extractor: FeatureExtractor, dataset_key: str, split_key: str, reference_key: str
) -> Path:
    """``cache_dir/rfid__<tokenizer sha256 prefix>__<extractor>__<weights sha256 prefix>__<dataset>__<split>__<reference>.json``.

    ``dataset_key`` is e.g. :func:`magnets.evaluation.media_key`, ``split_key``
    ``test-1000``, ``reference_key`` what the real side is (``test-1000``, or a
    statistics file's name). Each part must be a safe file-name part (letters,
    digits, ``.``, ``_``, ``-``), the rule of :func:`magnets.metrics.fid.stats_cache_path`.
    """
    parts = [tokenizer_sha[:16], extractor.name, extractor.weights_id[:16], dataset_key, split_key, reference_key]
    for part in parts:
        if not _SAFE_KEY.fullmatch(part):
            raise ValueError(f"{part!r} cannot name a cache file: use only letters, digits, '.', '_' and '-'")
    return Path(cache_dir) / ("rfid__" + "__".join(parts) + ".json")


def read_cached_rfid(path: Path) -> float | None:
    """The finite ``rfid`` value of a cache file, or None when it is missing or unreadable (a warning says which)."""
    if not path.is_file():
        return None
    try:
        value = float(json.loads(path.read_text())["rfid"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the rFID cache file %s (%s: %s); recomputing it", path, type(err).__name__, err)
        return None
    if not math.isfinite(value):
        log.warning("ignoring the rFID cache file %s (its value is %s); recomputing it", path, value)
        return None
    return value


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (or buffers) live; cpu for a module that has neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def reconstruction_features(
    tokenizer: Tokenizer, batches: Iterable, extractor: FeatureExtractor, progress: bool = True, total: int | None = None
) -> FeatureStats:
    """Statistics of ``extractor``'s features of ``tokenizer.decode(tokenizer.encode(media))``, batches ``(uint8 media, labels)``.

    Empty batches (every item unreadable) are skipped; ``total`` is the item count for the progress bar.
    """
    tokenizer_device = module_device(tokenizer)  # type: ignore[arg-type]
    accumulator = FeatureAccumulator()
    desc = f"rFID reconstructions ({extractor.name})"
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, mininterval=2.0) as bar:
        for media, _labels in batches:
            if len(media) == 0:
                continue
            ids = tokenizer.encode(to_unit_float(media).to(tokenizer_device))  # [B, *grid]
            reconstructions = tokenizer.decode(ids)  # [B, C, *spatial] in [0, 1]
            accumulator.update(extractor(reconstructions.to(extractor.device)))
            bar.update(len(media))
    return accumulator.stats()


def reconstruction_fid(
    tokenizer: Tokenizer,
    items: Callable[[], Iterable],
    extractor: FeatureExtractor,
    reference: FeatureStats,
    cache_path: str | Path | None = None,
    progress: bool = True,
) -> float:
    """Fréchet distance between ``extractor``'s features of the tokenizer's reconstructions of ``items()`` and ``reference``.

    ``items()`` gives batches ``(uint8 media [B, C, ...], labels)`` and is
    called only when there is no cached value. With ``cache_path``, a
    readable cached value is returned as it is; otherwise the value is
    computed and written there (atomically) with its item count.
    """
    path = None if cache_path is None else Path(cache_path)
    if path is not None:
        cached = read_cached_rfid(path)
        if cached is not None:
            log.info("rFID %.4f read from %s", cached, path)
            return cached
    batches = items()
    total = len(batches.dataset) if isinstance(batches, DataLoader) else None  # type: ignore[arg-type]
    stats = reconstruction_features(tokenizer, batches, extractor, progress=progress, total=total)
    value = frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)
    if path is not None:
        record = {
            "rfid": value, "count": stats.count, "extractor": extractor.name, "weights_id": extractor.weights_id,
            "reference_count": reference.count,
        }  # fmt: skip
        atomic_write_json(path, record)
    return value
