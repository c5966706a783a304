"""Launcher (python -m launch → torchrun) and the per-rank training entry point (launch.train)."""
