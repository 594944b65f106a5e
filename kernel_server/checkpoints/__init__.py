"""Checkpoints: the snapshot and its copies, the store, the file format."""
