"""The harness: expands matrix.yml, runs each cell in its framework's environment through a
backend, and merges the per-cell JSON results into comparison tables. Runs on the host."""
