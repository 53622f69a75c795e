"""Checkpoint files: safe reading and atomic writing, refcond's own format, and format detection."""

from refcond.checkpoints.importing import import_checkpoint
from refcond.checkpoints.io import read_checkpoint, write_safetensors

__all__ = ["import_checkpoint", "read_checkpoint", "write_safetensors"]
