"""Evaluate one decode configuration of a checkpoint: FID or FVD, Inception Score, class accuracy, GFLOPs and the
tokenizer's rFID; a row per seed (and, with several seeds, their mean and std rows) appended to a results CSV.

    python -m magnets.evaluate [experiment=fmnist] [checkpoint=last] [schedule=magnets_3333] [decode.cache=...]
        [seeds=[0,1,2] | repeats=3] [decode.guidance_scale=...]
        [samples=2000] [extractor=inception_offline | domain | i3d_torchscript extractor.path=FILE]
        [reference.npz=VIRTUAL_imagenet256_labeled.npz] [chunk_size=1000] [export_npz=samples.npz]
    make sweep EXP=fmnist SWEEP=schedules|cache|guidance        (Hydra multirun over conf/sweep/<SWEEP>.yaml)

The real side of the Fréchet distance is the statistics file ``reference.npz``
when given (ADM's reference batches, e.g. ``VIRTUAL_imagenet256_labeled.npz``
for the paper's ImageNet 256 protocol of 50,000 samples, or a file of
``FeatureStats.save``), else ``reference.count`` items of ``reference.split``,
their statistics cached in ``<paths.runs>/fid_stats`` per dataset, frames and
resolution, split, count, extractor and weights. Images give FID, clips FVD;
with the ``domain`` extractor (the run's own classifier) they are FID-domain /
FVD-domain, comparable between rows of one experiment but not to published
numbers. The Inception Score is of the extractor's logits: the published
one with ``inception_fidelity``; NaN with ``inception_offline``, whose
network ends at the pool features; in the project's classifier's classes
with ``domain`` (comparable within an experiment only). Class accuracy is the run's classifier's accuracy on
the samples against the classes asked for (under frame prediction, the real
clips' classes; the clips come from the reference split's token shard).

Samples are generated in chunks of ``chunk_size``, each written as it is
done to ``<samples_dir>/<key>/chunk-00000.npz`` ..., the key a hash of
everything that determines them (checkpoint and tokenizer sha256, task,
schedule, decode settings, seed, batch and chunk size, device type; see the
folder's ``settings.json``). Each chunk's decode is seeded from (seed,
chunk), so a rerun of an interrupted evaluation skips the chunks on disk and
ends with the samples and row of an unbroken one (on a GPU, up to its
kernels' nondeterminism); a later run of more samples, or with another
extractor or reference, reuses them too. The rows go to ``results`` (default
``<paths.runs>/<name>/results.csv``) in one append under a file lock, so
parallel multirun jobs can share the file.

Seeds: ``seeds=[s0, s1, ...]``, or ``repeats=R`` for ``seed .. seed+R-1``
(``seeds`` wins; a ``repeats`` beside it must be its length), evaluate each
seed's samples (its own chunk folder) against one reference, a row per seed
(``seed``), then with two or more seeds a ``mean`` and a ``std`` (ddof=1) row
(``aggregate``; ``n_seeds`` their number) of every numeric metric column.
``rfid`` is the tokenizer's reconstruction FID (FVD): the first
``reference.count`` items of ``reference.split`` encoded and decoded, their
features against the same reference (``reference.npz``'s when given), cached
in ``<paths.runs>/fid_stats/rfid__*.json``; no generated sample can do
better. ``main`` returns ``(frechet, gflops_per_sample)`` (the means over
seeds) for a Hydra sweeper to minimise.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from magnets.cli import check_choice, check_evaluate_config, evaluation_seeds, run_entry
from magnets.results import objectives


def check_config(cfg: DictConfig) -> None:
    """Everything ``python -m magnets.evaluate`` reads, before any model is loaded."""
    check_evaluate_config(cfg)
    evaluation_seeds(cfg)
    check_choice("rfid", cfg.rfid, [True, False])


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Decode and measure the configured samples, append the rows; the seed's row, or with several seeds the mean row
    (:func:`magnets.evaluation.evaluate_checkpoint`, imported here: torch loads only once the config passed its check)."""
    from magnets.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(cfg)


@hydra.main(config_path="../../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> tuple[float, float]:
    """The objectives of the run, for a Hydra sweeper: Fréchet distance and GFLOPs per sample (the means over seeds)."""
    return run_entry(lambda c: objectives(evaluate(c)), cfg, check_config)


if __name__ == "__main__":
    main()
