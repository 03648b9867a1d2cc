"""Criteo data for embpress: TSV reading, Parquet shards, statistics, synthetic data, Ray Data."""
