"""`python -m jobs.export`: write a serving copy of an exported model, with quantised tables.

The train job already exports its fp32 serving model (`embeddings.serving.export_model`);
this re-export stores the collapsed tables row-wise in fp16, int8 or int4 (the formats and
error bounds of `embeddings.methods.quantize`) without retraining, so one trained model can
be served at several sizes. The copy keeps the source's metadata (metrics, training config),
records where it came from, and is checked against the source before this command succeeds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from embeddings.serving import (
    COMPUTED_KEYS,
    MODEL_FILE,
    ModelFileError,
    export_model,
    load_model,
)

FORMATS = ("none", "fp16", "int8", "int4")

DESCRIPTION = """\
Re-export an exported embpress model (model.json + weights.safetensors, as written at the
end of python -m jobs.train) with its embedding tables quantised row-wise:
  none  fp32, exact (a verified copy)
  fp16  |error| <= 2^-11 |x| per value, half the bytes
  int8  |error| <= (row max - row min) / 510, about a quarter of the bytes
  int4  |error| <= (row max - row min) / 30, about an eighth of the bytes
The output is written to a temporary folder and moved into place only after it loads and
its scores on random rows agree with the source's within the format's bound.
"""

EPILOG = """\
examples:
  python -m jobs.export --model-dir runs/small_synthetic/model --out runs/small_int8 --quantize int8
  serve deploy deploy/serve.yaml   # after pointing user_config.model_dir at the new folder
"""


class ExportError(RuntimeError):
    """The export cannot be made; the message says why."""


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
    parser.add_argument("--quantize", choices=FORMATS, default="none",
                        help="storage of the embedding tables (default: %(default)s)")
    parser.add_argument("--version", help="version recorded in the new model.json "
                                          "(default: the source's, with the format appended)")
    return parser


def _check_source(model_dir: Path) -> None:
    if model_dir.is_dir() and not (model_dir / MODEL_FILE).exists():
        shards = [p.name for p in model_dir.iterdir() if p.suffix == ".pt" or "rank" in p.name]
        hint = (" It looks like a Ray Train checkpoint: the train job exports the serving "
                "model at its end (export.out, default <run folder>/model); re-export from "
                "that folder." if shards else "")
        raise ExportError(f"{model_dir} has no {MODEL_FILE}: not an exported model.{hint}")


def _agreement(source: torch.nn.Module, copy: torch.nn.Module) -> float:
    """Largest probability difference between two models on random Criteo-like rows."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.log1p(torch.randint(0, 1000, (4096, 13), generator=generator).float())
    sparse = torch.randint(0, 2**32, (4096, 26), generator=generator)
    with torch.inference_mode():
        a = torch.sigmoid(source(dense, sparse))
        b = torch.sigmoid(copy(dense, sparse))
    return float((a - b).abs().max())


def export(model_dir: Path, out: Path, fmt: str, version: str | None = None) -> dict[str, Any]:
    """Write the re-export; a summary of what was written."""
    _check_source(model_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new --out")
    if out.resolve() == model_dir.resolve():
        raise ExportError("--out must differ from --model-dir: the source stays untouched")
    try:
        source, document = load_model(model_dir)
    except ModelFileError as exc:
        raise ExportError(str(exc)) from None
    previous = document.get("quantize", "none")
    if previous not in ("none", "fp32", None) and fmt != "none":
        raise ExportError(f"{model_dir} is already quantised ({previous}); quantise the fp32 "
                          "export instead, or errors add up")
    quantised = source.quantize(fmt)
    metadata = {k: v for k, v in document.items() if k not in COMPUTED_KEYS}
    metadata.update(
        quantize=previous if fmt == "none" else fmt,
        source={"model_dir": str(model_dir.resolve()),
                "weights_sha256": document["weights_sha256"]},
    )
    if version or "version" in document:
        metadata["version"] = version or (document["version"] if fmt == "none"
                                          else f"{document['version']}-{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700); a server running as another user must
        # still read it, so give it the permissions an ordinary mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        export_model(quantised, staging, metadata)
        reloaded, written = load_model(staging)
        error = _agreement(source, reloaded)
        if fmt == "none" and error > 1e-6:
            raise ExportError(f"the copy scores differently from the source (max |Δp| {error})")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "quantize": metadata["quantize"],
        "version": written.get("version"),
        "bytes_before": document["serving_bytes"]["embeddings"],
        "bytes_after": written["serving_bytes"]["embeddings"],
        "max_probability_change": error,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export(Path(args.model_dir), Path(args.out), args.quantize, args.version)
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
