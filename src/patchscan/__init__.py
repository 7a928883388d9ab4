"""patchscan: Patchscopes experiments from Hydra configs.

The flow is one way: dataset -> scope (work items) -> runner (batches) -> engine (patched
runs) -> rows -> Parquet -> metrics and plots.
"""

__version__ = "0.1.0"
