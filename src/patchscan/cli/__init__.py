"""The command line: argv to Hydra configs to runs (main) and the one-example `inspect` command."""
