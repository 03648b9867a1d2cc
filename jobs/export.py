"""`python -m jobs.export`: write a serving copy of an exported model, with quantised tables.

The train job already exports its fp32 serving model (`embeddings.serving.export_model`);
this re-export stores the collapsed tables row-wise in fp16, int8 or int4 (the formats and
error bounds of `embeddings.methods.quantize`) without retraining, so one trained model can
be served at several sizes. The copy keeps the source's metadata (metrics, training config),
records where it came from, and is checked against the source before this command succeeds.
The work is `training.export.reexport`; this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embeddings.budget import EXPORT_QUANTIZE
from training.export import ExportError, reexport, reexport_mixed

DESCRIPTION = """\
Re-export an exported embpress model (model.json + weights.safetensors, as written at the
end of python -m jobs.train) with its embedding tables quantised row-wise:
  none  fp32, exact (a verified copy)
  fp16  |error| <= 2^-11 |x| per value, half the bytes
  int8  |error| <= (row max - row min) / 510, about a quarter of the bytes
  int4  |error| <= (row max - row min) / 30, about an eighth of the bytes
  mixed each row int4, int8 or fp16 by how often the data reads it, so the embeddings fit
        --budget-bytes (frequency-banded post-training precision: MPE's baseline)
The output is written to a temporary folder and moved into place only after it loads and
its scores on random rows agree with the source's within the format's bound.
"""

EPILOG = """\
examples:
  python -m jobs.export --model-dir runs/small_synthetic/model --out runs/small_int8 --quantize int8
  python -m jobs.export --model-dir runs/small_synthetic/model --out runs/small_mixed \
      --quantize mixed --budget-bytes 100000
  serve deploy deploy/serve.yaml   # after pointing user_config.model_dir at the new folder
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-dir", "--checkpoint", dest="model_dir", required=True,
                        metavar="DIR", help="an exported model directory (--checkpoint is "
                        "accepted as another name; Ray Train checkpoints are not read yet)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write (must not exist, or be empty)")
    parser.add_argument("--quantize", choices=(*EXPORT_QUANTIZE, "mixed"), default="none",
                        help="storage of the embedding tables (default: %(default)s)")
    parser.add_argument("--budget-bytes", type=int, metavar="N",
                        help="with --quantize mixed: serving bytes the embeddings must fit")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="with --quantize mixed: prepared data whose statistics count "
                             "each row's accesses (default: the data the model trained on)")
    parser.add_argument("--version", help="version recorded in the new model.json "
                                          "(default: the source's, with the format appended)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mixed = args.quantize == "mixed"
    if mixed and (args.budget_bytes is None or args.budget_bytes <= 0):
        parser.error("--quantize mixed needs --budget-bytes N (N > 0)")
    if not mixed and (args.budget_bytes is not None or args.data is not None):
        parser.error("--budget-bytes and --data go with --quantize mixed")
    try:
        if mixed:
            summary = reexport_mixed(Path(args.model_dir), Path(args.out), args.budget_bytes,
                                     args.data, args.version)
        else:
            summary = reexport(Path(args.model_dir), Path(args.out), args.quantize,
                               args.version)
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    ratio = summary["bytes_before"] / max(summary["bytes_after"], 1)
    print(f"wrote {summary['out']} ({summary['quantize']}, version {summary['version']}): "
          f"embeddings {summary['bytes_before']:,} → {summary['bytes_after']:,} bytes "
          f"({ratio:.1f}× smaller); largest change of a probability on 4,096 random rows: "
          f"{summary['max_probability_change']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
