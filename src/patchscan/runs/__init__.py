"""The experiment runner: config checks, the run's identity and its one writer, parts and resume,
shards, the dry run, the row schema of the Parquet output."""
