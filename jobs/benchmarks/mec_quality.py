"""Benchmark: MEC against the hashing trick at the same realised bytes (issue 18's goal).

Single process, no Ray, on the generator's synthetic Criteo (as tests/embeddings/
test_quality.py): an uncompressed DLRM trains for `--steps` steps; MEC is built from it at
`--ratio` (against the trained tables; features MEC cannot bring to the ratio, the small ones,
keep their trained table) and fine-tuned for `--steps` more on the next rows, with the trained
dense layers;
the hashing trick trains from scratch for 2 × `--steps` (the samples both stages of MEC saw)
at a byte budget equal to MEC's realised serving bytes. Prints validation AUC and bytes.
Run: `python jobs/benchmarks/mec_quality.py --out /tmp/mec_quality [--rows 1200000]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import copy
import time
from typing import Any

import torch
from torch import nn

from data_pipeline.datasets import iter_local_batches
from data_pipeline.stats import load_feature_stats
from embeddings.budget import uncompressed_bytes
from embeddings.collection import CollectionConfig, EmbeddingCollection
from embeddings.methods.base import FeatureStats, TrainedFeature
from embeddings.methods.mec import MECConfig
from embeddings.metrics import roc_auc
from embeddings.models import model_preset
from embeddings.optim import train_step
from embeddings.tables import TableOptimizer
from jobs import synth


def _batches(data: Path, batch: int) -> Any:
    while True:  # epochs over the train split
        yield from iter_local_batches(data, "train", batch, drop_last=True)


def _train(data: Path, collection: nn.Module, dense: nn.Module, steps: int, batch: int,
           skip: int = 0) -> None:
    """`steps` steps on the train split's batches from batch `skip` on (stage 2 goes on with
    the rows stage 1 has not seen: a CTR model trained twice on a row overfits)."""
    opt = torch.optim.Adam([*dense.parameters(), *collection.dense_parameters()], lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for step, b in enumerate(_batches(data, batch)):
        if step < skip:
            continue
        if step == skip + steps:
            break
        loss = loss_fn(dense(b["dense"], collection(b["sparse"])), b["label"])
        train_step(loss, None, opt, collection)


def _auc(data: Path, collection: nn.Module, dense: nn.Module) -> float:
    logits, labels = [], []
    with torch.no_grad():
        for b in iter_local_batches(data, "validation", 65536):
            logits.append(dense(b["dense"], collection(b["sparse"])))
            labels.append(b["label"])
    return roc_auc(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1_200_000)
    parser.add_argument("--steps", type=int, default=120, help="steps of each stage")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=10.0, help="MEC's ratio")
    parser.add_argument("--mec-steps", type=int, default=100, help="stage 1's VQ-VAE steps")
    parser.add_argument("--lr", type=float, default=0.1, help="row-wise Adagrad's lr")
    parser.add_argument("--mec-lr", type=float, default=0.1,
                        help="fine-tuning lr of MEC's tables (0.01 gave 0.0031 less AUC)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--keep-all", action="store_true",
                        help="control: every feature keeps its trained table (stage 2 is then "
                             "the uncompressed model trained on)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.out / "data"
    if not data.exists():
        synth.main(["--rows", str(args.rows), "--days", "2", "--out", str(data), "--seed", "11",
                    "--no-ray", "--no-progress"])
    stats = load_feature_stats(data)
    names = list(stats.features)
    cards = [stats.num_distinct(f) for f in names]
    feature_stats = {n: FeatureStats(*stats.counts(n)) for n in names}
    model_config = model_preset("dlrm-small")
    dim = model_config.embedding_dim
    rows: list[tuple[str, float, int, float]] = []

    t0 = time.perf_counter()
    torch.manual_seed(0)
    full = EmbeddingCollection(CollectionConfig(dim=dim, cardinalities=cards, names=names),
                               feature_stats, optimizer=TableOptimizer(lr=args.lr))
    dense = model_config.build()
    _train(data, full, dense, args.steps, args.batch)
    rows.append(("uncompressed", _auc(data, full, dense), full.serving_bytes(),
                 time.perf_counter() - t0))

    t0 = time.perf_counter()
    methods = {}
    for name, n in zip(names, cards, strict=True):
        trained = TrainedFeature(full.method(name).collapse(), feature_stats[name])
        try:
            if args.keep_all:
                raise ValueError("control")
            methods[name] = MECConfig(ratio=args.ratio, steps=args.mec_steps).from_trained(
                n, dim, trained)
        except ValueError:  # too small for MEC at this ratio: the trained table stays
            methods[name] = MECConfig(min_values=2**62).from_trained(n, dim, trained)
    mec = EmbeddingCollection.from_methods(methods, dim, TableOptimizer(lr=args.mec_lr))
    mec_dense = copy.deepcopy(dense)
    start_auc = _auc(data, mec, mec_dense)
    _train(data, mec, mec_dense, args.steps, args.batch, skip=args.steps)
    rows.append((f"mec@{args.ratio:g}x (start {start_auc:.4f})", _auc(data, mec, mec_dense),
                 mec.serving_bytes(), time.perf_counter() - t0))

    t0 = time.perf_counter()
    torch.manual_seed(0)
    hashed = EmbeddingCollection(
        CollectionConfig(dim=dim, cardinalities=cards, names=names,
                         budget_bytes=mec.serving_bytes(), method={"method": "hash"}),
        feature_stats, optimizer=TableOptimizer(lr=args.lr))
    hash_dense = model_config.build()
    _train(data, hashed, hash_dense, 2 * args.steps, args.batch)
    rows.append(("hash at MEC's bytes", _auc(data, hashed, hash_dense), hashed.serving_bytes(),
                 time.perf_counter() - t0))

    reference = sum(uncompressed_bytes(n, dim) for n in cards)
    print(f"\n{args.rows:,} synthetic rows, dlrm-small d={dim}, {args.steps} steps per stage "
          f"of {args.batch}; ratio = n×d fp32 bytes ({reference / 2**20:.1f} MiB) / realised")
    print(f"{'model':<34} {'val AUC':>8} {'serving MiB':>12} {'ratio':>7} {'seconds':>8}")
    for name, auc, served, seconds in rows:
        print(f"{name:<34} {auc:>8.4f} {served / 2**20:>12.2f} {reference / served:>7.2f} "
              f"{seconds:>8.0f}")


if __name__ == "__main__":
    main()
