"""Checkpoints: sharded, atomic, reshardable save/load (sharded), the map from a layout's parameters to the
unmodified model's (layout), and an engine's whole state through them (engine_state)."""
from parallel.checkpoint.sharded import Piece, latest, load_full, load_pieces, read_meta, save_pieces, step_dir

__all__ = ["Piece", "save_pieces", "read_meta", "load_full", "load_pieces", "latest", "step_dir"]
