"""Checkpoint files: safe reading and atomic writing, refcond's own format, and format detection."""

from refcond.checkpoints.io import read_checkpoint, write_safetensors
from refcond.checkpoints.importing import import_checkpoint

__all__ = ["import_checkpoint", "read_checkpoint", "write_safetensors"]
