"""Metrics computed from Parquet rows only, so `patchscan eval` and scripts reuse them."""
