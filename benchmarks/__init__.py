"""The repository's benchmarks, not installed with the package: ``python -m benchmarks.suite.<module>`` from the
repository's root, or a script under a folder here by its path (see README.md)."""
