"""What answers may show of the server: model.json without paths, messages without paths.

Answers must not map the server's disk, and model.json carries the training config (data
and run paths), so everything a client reads about the model or an error passes here.
"""

from __future__ import annotations

import re
from typing import Any

# What a client may see of model.json: the model's shape and quality, never where it was
# trained or stored (the training config holds data and run paths).
PUBLIC_MODEL_KEYS = ("format", "schema_version", "version", "features", "num_dense",
                     "embedding_dim", "model", "serving_bytes", "metrics", "quantize",
                     "weights_sha256")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:\\|/)[^\s'\"():,]+")


def without_paths(text: str) -> str:
    """A message with every absolute path replaced (answers must not map the server's disk)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return without_paths(value) if isinstance(value, str) else value


def public_model(document: dict[str, Any]) -> dict[str, Any]:
    """model.json as clients see it: features, dims, methods, bytes, metrics; no paths."""
    shown = {k: document[k] for k in PUBLIC_MODEL_KEYS if k in document}
    shown["methods"] = sorted({_method(e) for e in document.get("embeddings", {}).values()})
    return _public(shown)


def _method(embedding: dict[str, Any]) -> str:
    """A feature's serving form in a word: its mapper kind(s) and table formats."""
    parts = embedding.get("parts") or [embedding]
    kinds = sorted({str(p.get("mapper", {}).get("kind", "?")) for p in parts})
    formats = sorted({str(t.get("fmt", "fp32")) for p in parts for t in p.get("tables", [])})
    return "+".join(kinds) + (f" ({'/'.join(formats)})" if formats else "")
