"""Compressed embedding tables, CTR models and the single-layer serving form."""
