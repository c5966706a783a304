"""Data parallelism: gradient buckets and the overlapped reducer."""
