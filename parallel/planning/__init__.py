"""Predictions before launch: the layout planner and FLOP counts."""
