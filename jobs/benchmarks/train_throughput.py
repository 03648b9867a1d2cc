"""Benchmark: samples/s of the Ray Train job (2 workers) beside a plain single-process loop.

Both train the same model (DLRM small, the same compressed collection) on the same
synthetic shards with the same global batch; the plain loop is PyTorch alone in this
process (pyarrow reading, every core to torch), the job is `training.run.run` with 2 workers
at 0.5 CPU each (data read through Ray Data, lookups through all-to-all, DDP). The goal
(issue 4) is a ratio ≥ 0.8 on this 2-core machine. Run:
`python jobs/benchmarks/train_throughput.py [--rows 1000000] [--steps 300] [--method hash]`
(`--method cafe` routes every large feature through all-to-all; hash at 10× replicates the
small tables, whose gradients are all-reduced).

Both rates are counted from the first batch in hand: the plain loop after 10 warm-up steps,
the job after its Ray Data start-up (printed beside them). Steps run over several epochs when
the split is shorter than they need.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import os
import tempfile
import time

import torch
from torch import nn

from data_pipeline.datasets import iter_local_batches
from data_pipeline.stats import load_feature_stats
from embeddings.collection import EmbeddingCollection
from embeddings.optim import train_step
from jobs import synth
from jobs.ray_session import ensure_ray
from training.config import TrainConfig
from training.plan import cardinalities_of
from training.run import run


def plain_loop(config: TrainConfig, steps: int, warmup: int = 10) -> float:
    """Samples/s of the same model trained in this process, no Ray."""
    torch.manual_seed(config.seed)
    _, cards = cardinalities_of(load_feature_stats(config.data.path))
    collection = EmbeddingCollection(config.collection(cards),
                                     optimizer=config.optimizer.table_optimizer())
    dense = config.model_spec.build()
    dense_opt = torch.optim.Adam([*dense.parameters(), *collection.dense_parameters()],
                                 lr=config.optimizer.dense_lr)
    loss_fn = nn.BCEWithLogitsLoss()
    def epochs():  # as many passes over the train split as the steps need
        while True:
            yield from iter_local_batches(config.data.path, "train", config.data.batch_size,
                                          drop_last=True)

    t0 = 0.0
    for i, batch in enumerate(epochs()):
        if i == warmup:
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        loss = loss_fn(dense(batch["dense"], collection(batch["sparse"])), batch["label"])
        train_step(loss, None, dense_opt, collection)
    return steps * config.data.batch_size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--method", default="hash")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth.main(["--rows", str(args.rows), "--days", "2", "--out", str(data), "--no-ray",
                    "--no-progress"])
        config = TrainConfig.model_validate({
            "data": {"path": str(data), "batch_size": args.batch_size},
            "embeddings": {"ratio": 10, "method": {"method": args.method}},
            "schedule": {"max_steps": args.steps, "epochs": 100, "log_every": 50},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
            "run": {"storage_path": str(Path(tmp) / "runs"), "name": "bench"},
        })
        threads = torch.get_num_threads()
        plain = plain_loop(config, args.steps)
        ensure_ray(num_cpus=os.cpu_count())
        metrics = run(config, verbose=False).metrics
        ray_rate, startup = metrics["samples_per_s"], metrics["startup_s"]
    print(f"\ntrain throughput, DLRM small, {args.method} at 10x, global batch {args.batch_size}, "
          f"{args.steps} steps")
    print(f"{'path':<44} {'samples/s':>12}")
    print(f"{f'plain PyTorch loop, 1 process, {threads} threads':<44} {plain:>12,.0f}")
    print(f"{'Ray Train job, 2 workers x 0.5 CPU':<44} {ray_rate:>12,.0f}")
    print(f"ratio (goal >= 0.8): {ray_rate / plain:.2f}")
    print(f"(both from their first batch on: the plain loop after 10 warm-up steps, the job "
          f"after its Ray Data start-up of {startup:.1f} s; cluster start not counted)")


if __name__ == "__main__":
    main()
