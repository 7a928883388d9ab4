"""PNG figures made from Parquet results (through the metrics computed from them)."""
