"""Checkpoints: sharded, atomic, reshardable save/load (sharded), the map from a layout's parameters to the
unmodified model's (layout; on the meta device: meta_probe), reads of a rank's own byte ranges only (ranged),
an engine's whole state through them (engine_state), background saves (async_save) and the streamed,
sharded Hugging Face export and import (hf_export)."""
from parallel.checkpoint.sharded import Piece, latest, load_full, load_pieces, read_meta, save_pieces, step_dir

__all__ = ["Piece", "save_pieces", "read_meta", "load_full", "load_pieces", "latest", "step_dir"]
