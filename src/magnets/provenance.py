"""What produced each artifact, and the checks that refuse an artifact made from something else.

Two kinds of record:

- **Content identities**: the sha256 of a file's bytes. Token shards record the
  tokenizer that wrote them (``meta.json``); a transformer checkpoint records
  the tokenizer of the tokens it trained on and the identity of each token
  split (``checkpoint["provenance"]``); every ``results.csv`` row records its
  checkpoint, tokenizer, extractor and classifier (16 hex digits each).
- **Training keys**: the config fields that determine a stage's output. A
  trained tokenizer carries its run config (``checkpoint["config"]``), a
  classifier its key (``trained_with``); the stage reuses an output only when
  the key computed from the current config equals the recorded one, else it
  refuses, naming each differing field.

Where the data files are found (``root``, download address, search of the
Debian folder) and how they are loaded (workers) are not part of a key: they do
not change which items a stage sees.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from magnets.errors import MismatchError
from magnets.files import file_sha256

IDENTITY_DIGITS = 16
"""Hex digits of a sha256 kept as an identity in result rows and messages (64 bits)."""

DATA_LOCATION_KEYS = frozenset(
    {"root", "download_url", "search_debian", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
)
"""``data.module`` fields that say where the files are found or how they are loaded, not which items a stage sees."""

TOKENIZER_CHECKS = ("match", "override", "unrecorded")
"""``tokenizer_check`` of a results row: the tokenizer is the one the checkpoint trained on; it is not, and
``allow_tokenizer_mismatch=true`` said to go on; the checkpoint records no tokenizer (written before it did)."""


def short(sha256: str | None) -> str:
    """The first :data:`IDENTITY_DIGITS` hex digits of a sha256; empty for None."""
    return "" if not sha256 else sha256[:IDENTITY_DIGITS]


def identity(path: str | Path) -> str:
    """The identity of a file: its :func:`short` sha256."""
    return short(file_sha256(path))


def plain(config: DictConfig | dict[str, Any] | None) -> dict[str, Any]:
    """``config`` as a resolved plain dict (an empty one for None)."""
    if config is None:
        return {}
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


def data_selection(data: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The ``data`` group without its :data:`DATA_LOCATION_KEYS`: which items, at which geometry and classes."""
    selection = plain(data)
    # _target_, the datamodule class, is left out too: data.name names the dataset, and configs saved before it existed
    # lack it.
    module = {k: v for k, v in (selection.get("module") or {}).items() if k not in DATA_LOCATION_KEYS and k != "_target_"}
    return selection | {"module": module}


def tokenizer_training_key(config: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """What determines a trained tokenizer: its kind, network, optimiser, codebook, trainer settings and seed, and the
    data selection (``config``: a run's whole config, the current one or the one saved in a checkpoint)."""
    config = plain(config)
    tokenizer = config.get("tokenizer") or {}
    settings = {k: tokenizer.get(k) for k in ("kind", "model", "optim", "codebook", "trainer")}
    # A tokenizer trained before tokenizer.seed existed was seeded with the run's seed: its config records that one.
    settings["seed"] = tokenizer["seed"] if "seed" in tokenizer else config.get("seed")
    return {"tokenizer": settings, "data": data_selection(config.get("data") or {})}


def classifier_training_key(config: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """What determines the data's classifier: the data selection (with the class count), its epochs, batch size and
    seed."""
    config = plain(config)
    classifier = config.get("classifier") or {}
    return {
        "data": data_selection(config.get("data") or {}),
        "classifier": {k: classifier.get(k) for k in ("epochs", "batch_size", "seed")},
    }


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def key_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every dotted field on which two keys differ (a missing one is None)."""
    old, new = flatten(saved), flatten(current)
    return [(field, old.get(field), new.get(field)) for field in sorted(set(old) | set(new)) if old.get(field) != new.get(field)]


def check_same_key(what: str, path: Path, saved: dict[str, Any] | None, current: dict[str, Any], remedy: str) -> None:
    """Refuse to reuse ``path`` (``what``, e.g. "classifier") unless its recorded key ``saved`` equals ``current``.

    The message names every differing field with both values, and ``remedy``.
    """
    if saved is None:
        raise MismatchError(f"{what} {path} records no training settings, so it cannot be shown to fit this run: {remedy}")
    differences = key_differences(saved, current)
    if differences:
        listed = "; ".join(f"{field}: saved {old!r}, now {new!r}" for field, old, new in differences)
        raise MismatchError(f"{what} {path} was trained with other settings ({listed}): {remedy}")


def split_identity(split_dir: str | Path) -> str:
    """The identity of a split of token shards: the sha256 of its shards' ``meta.json`` files in order (a rewritten shard
    records a new creation time, so it gives a new identity)."""
    split_dir = Path(split_dir)
    metas = sorted(split_dir.glob("shard-*/meta.json")) or sorted(split_dir.glob("meta.json"))
    digest = hashlib.sha256()
    for meta in metas:
        digest.update(meta.parent.name.encode())
        digest.update(meta.read_bytes())
    return short(digest.hexdigest())


def check_tokenizer_identity(
    recorded: str | None, tokenizer_path: Path, checkpoint: Path, allow_mismatch: bool
) -> tuple[str, str]:
    """The tokenizer's identity and its ``tokenizer_check`` (:data:`TOKENIZER_CHECKS`) against the one ``checkpoint``'s
    transformer trained on (``recorded``, a sha256 or None).

    A different tokenizer is refused with one line naming both identities, unless ``allow_mismatch`` (the row then says
    ``override``): its codes would decode into other pictures than the ones the transformer learned.
    """
    actual = identity(tokenizer_path)
    if not recorded:
        return actual, "unrecorded"
    if short(recorded) == actual:
        return actual, "match"
    if allow_mismatch:
        return actual, "override"
    raise MismatchError(
        f"tokenizer {tokenizer_path} (sha256 {actual}) is not the one {checkpoint} was trained on (sha256 "
        f"{short(recorded)}): give that tokenizer as tokenizer_checkpoint=, or set allow_tokenizer_mismatch=true to "
        "decode with this one anyway (the rows say tokenizer_check=override)"
    )
