"""Data: the binary split format, Criteo TSV preparation, the synthetic generator, batches."""
