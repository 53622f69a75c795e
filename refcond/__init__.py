"""refcond: condition text-to-image diffusion models on a group of reference images.

>>> import refcond
>>> rp = refcond.from_pipe(pipe, "ip-adapter", checkpoint="ip-adapter_sd15.safetensors")  # doctest: +SKIP
>>> image = rp("a dog", references=["a.png", "b.png"]).images[0]  # doctest: +SKIP
"""

from refcond.aggregators import require_per_reference_tokens, split_references
from refcond.building import check_state_dict
from refcond.checkpoints.io import PICKLE_SUFFIXES, read_checkpoint, read_metadata, require_regular_file, write_safetensors
from refcond.checkpoints.native import describe_checkpoint
from refcond.config import ComponentConfig, ComponentSpec, Composition, EmptyConfig
from refcond.contracts import (
    MIXED_SOURCE,
    Aggregator,
    Attachment,
    Backbone,
    BorrowedWeights,
    BuildContext,
    CheckpointFormat,
    Condition,
    Encoder,
    ImportedCheckpoint,
    Injector,
    Metric,
    ReferenceAdapter,
    ReferenceEncoding,
)
from refcond.errors import (
    CheckpointError,
    ConfigError,
    DuplicateComponentError,
    IncompatibleBackboneError,
    OutputError,
    PluginError,
    RefcondError,
    ReferenceImageError,
    UnknownComponentError,
    did_you_mean,
)
from refcond.hookspecs import hookimpl
from refcond.images import load_references
from refcond.pipeline import RefcondPipeline, from_pipe, load
from refcond.plugins import Plugins, from_modules, get_plugins, load_plugins
from refcond.registry import Register
from refcond.sources import DeviceName, check_device, check_model_source, load_pretrained
from refcond.unet import CrossAttentionLayer, cross_attention_layers, layer_scales
from refcond.weights import content_hash, weights_fingerprint

__version__ = "0.1.0"


def train(*args: object, **kwargs: object) -> object:
    """Train a composition: :func:`refcond.training.train` (imported on first use: it loads accelerate)."""
    from refcond.training import train as run

    return run(*args, **kwargs)  # type: ignore[arg-type]

__all__ = [
    "MIXED_SOURCE",
    "PICKLE_SUFFIXES",
    "Aggregator",
    "Attachment",
    "Backbone",
    "BorrowedWeights",
    "BuildContext",
    "CheckpointError",
    "CheckpointFormat",
    "ComponentConfig",
    "ComponentSpec",
    "Composition",
    "Condition",
    "ConfigError",
    "CrossAttentionLayer",
    "DeviceName",
    "DuplicateComponentError",
    "EmptyConfig",
    "Encoder",
    "ImportedCheckpoint",
    "IncompatibleBackboneError",
    "Injector",
    "Metric",
    "OutputError",
    "PluginError",
    "Plugins",
    "RefcondError",
    "RefcondPipeline",
    "ReferenceAdapter",
    "ReferenceEncoding",
    "ReferenceImageError",
    "Register",
    "UnknownComponentError",
    "check_device",
    "check_model_source",
    "check_state_dict",
    "content_hash",
    "cross_attention_layers",
    "describe_checkpoint",
    "did_you_mean",
    "from_modules",
    "from_pipe",
    "get_plugins",
    "hookimpl",
    "layer_scales",
    "load",
    "load_plugins",
    "load_pretrained",
    "load_references",
    "read_checkpoint",
    "read_metadata",
    "require_per_reference_tokens",
    "require_regular_file",
    "split_references",
    "train",
    "weights_fingerprint",
    "write_safetensors",
]
