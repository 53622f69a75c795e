"""Checkpoint files: safe reading and atomic writing, refcond's own format, and format detection."""

from refcond.checkpoints.importing import CheckpointFile, import_checkpoint, open_checkpoint
from refcond.checkpoints.io import read_checkpoint, write_safetensors

__all__ = ["CheckpointFile", "import_checkpoint", "open_checkpoint", "read_checkpoint", "write_safetensors"]
