"""The training library: what a Ray Train worker runs and what its driver decides.

Between the methods (`embeddings`, `data_pipeline`) and the entry points (`jobs`): the
config, the plan, the per-worker train function with its evaluation, checkpoints and
export, and the search over compression settings (`training.search`). Never imports
`jobs` or `services`.
"""
