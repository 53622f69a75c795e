"""An on-disk cache of a frozen encoder's encodings, keyed by content, so later epochs and runs skip the encoder.

While a training stage leaves the composition's encoder frozen (no weight it reads requires grad),
what it produces for a sample depends only on

- the encoder: its weights (:func:`refcond.content_hash` of its module and of the borrowed modules
  it reads outside its tree), its resolved config, its class and the version of the plugin that
  registered it, the kind of device it runs on and the autocast in force there;
- the sample: its reference images as the encoder receives them (mode, size and pixels, in order),
  its prompt when the encoder reads one (``reads_prompt``), and whether it is the unconditional
  encoding (``encode_unconditional``).

The SHA-256 of all that is the sample's key; its encoding is one file
``<folder>/<key[:2]>/<key>.safetensors`` (``tokens [L, D]``, ``mask [L]``, ``source [L]``, the row
without its padding; a checksum and the key in the metadata), written atomically, so the processes
of a data-parallel run may write the same key at once. Reading gives back the tensors the encoder
produced, bit for bit, in their dtype, on the encoder's device; a batch's rows are padded on the
right again (:meth:`refcond.ReferenceEncoding.concat_batches`), which the mask makes equivalent to
any other padding. A file that does not read back as written (truncated, other tensors or shapes,
another checksum) is a miss: it is recomputed and overwritten, with one warning per stage.

:meth:`EncodingCache.serving` puts a caching stand-in for the encoder in place while ``rp.encode``
runs: the conditioning path stays the one generation uses. A sample the folder holds is read back;
when a batch has any sample the folder lacks, the encoder encodes the whole batch, as it would
without the cache, and the samples that were lacking are stored. A sample's encoding is thus the
first one ever computed for it.

The encoder sees whole batches only, because kernels may round a smaller batch differently in the
last bits (CLIP on a CPU: up to 5e-7 between 1 and 2 images). So what a step computes never depends
on how many of a batch's files a killed run managed to write: a resumed run ends with the weights
of an uninterrupted one, bit for bit. Training with the cache ends with the weights of training
without it when every cached sample is read back in the batch that encoded it (a first epoch then
epochs over the same draws, or a second run); otherwise the last bits may differ.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from refcond.checkpoints.io import write_safetensors
from refcond.contracts import ReferenceEncoding
from refcond.errors import RefcondError
from refcond.weights import borrowed_weights, content_hash, is_trainable, tensors_hash

if TYPE_CHECKING:
    from PIL.Image import Image

    from refcond.training.config import StageConfig, TrainConfig

#: Written into every file and into every key: a new layout makes old files misses, not errors.
FORMAT = "refcond-encoding-cache/1"
#: The folder under a run's output when ``TrainConfig.encoding_cache`` names none.
DEFAULT_FOLDER = "encoding-cache"
_TENSORS = ("tokens", "mask", "source")


def cache_folder(run: TrainConfig) -> Path:
    """The run's cache folder: ``run.encoding_cache``, or ``<output>/encoding-cache``."""
    return Path(run.encoding_cache) if run.encoding_cache is not None else Path(run.output) / DEFAULT_FOLDER


def stage_cache(rp: Any, run: TrainConfig, stage: StageConfig) -> EncodingCache | None:
    """The stage's cache, or ``None`` when the stage disables it, there is no encoder, or the encoder trains.

    Call it after the stage's selection is applied (``requires_grad`` set): that is what it reads.
    """
    if not stage.cache_encodings or rp.encoder is None or not encoder_is_frozen(rp):
        return None
    return EncodingCache(cache_folder(run), rp)


def _encoder_modules(encoder: Any) -> list[torch.nn.Module]:
    """The modules whose weights an encoder reads: itself, and what it borrows from outside its tree (a pipeline's CLIP)."""
    modules = [encoder] if isinstance(encoder, torch.nn.Module) else []
    return modules + [part.module for part in borrowed_weights(encoder, "encoder") if part.prefix is None]


def encoder_is_frozen(rp: Any) -> bool:
    """Whether no weight the composition's encoder reads requires grad (``False`` without an encoder)."""
    if rp.encoder is None:
        return False
    # The encoder's own parameters are what rp.named_parameters() names "encoder.*" (asked of the encoder alone: cheaper).
    named = getattr(rp.encoder, "named_parameters", None)
    own = callable(named) and any(parameter.requires_grad for _, parameter in named())
    return not own and not any(is_trainable(module) for module in _encoder_modules(rp.encoder))


#: torch's dropout layers, by their public names.
_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _is_random(encoder: Any) -> bool:
    """Whether a dropout layer of the encoder is active: its output is then a draw, not a function of its input."""
    return any(
        isinstance(layer, _DROPOUT) and layer.training and layer.p > 0
        for module in _encoder_modules(encoder)
        for layer in module.modules()
    )


class EncodingCache:
    """One stage's view of a cache folder for the composition of ``rp`` (see the module docstring).

    :ivar hits: samples read from the folder (conditional and unconditional encodings counted apart).
    :ivar misses: samples the encoder computed.
    :ivar bad: files that did not read back and were recomputed.
    """

    def __init__(self, folder: str | Path, rp: Any):
        self.folder = Path(folder)
        self.hits = self.misses = self.bad = 0
        self._rp = rp
        self._encoder_part: str | None = None
        self._device: torch.device | None = None
        self._writable = True
        self._warned: set[str] = set()

    # -- the stand-in ---------------------------------------------------------------------------

    @contextmanager
    def serving(self) -> Iterator[None]:
        """For the length of the block, ``rp.encode`` reads the encoder's two methods through this cache.

        Nothing changes while the encoder trains (its encodings change at every step) or has an
        active dropout layer (its encodings are draws); the block then runs the encoder as usual.
        """
        rp = self._rp
        encoder = rp.encoder
        if encoder is None or not encoder_is_frozen(rp):
            yield
            return
        if _is_random(encoder):
            self._warn_once("random", "encoding cache: the frozen encoder has an active dropout layer, so its encodings are not cached.")
            yield
            return
        rp.encoder = _CachingEncoder(self, encoder)
        try:
            yield
        finally:
            rp.encoder = encoder

    # -- keys -----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the encoder's outputs are: where its last output was, else where its first weight is (the CPU without weights)."""
        if self._device is None:
            tensors = (t for module in _encoder_modules(self._rp.encoder) for t in (*module.parameters(), *module.buffers()))
            first = next(tensors, None)
            self._device = first.device if first is not None else torch.device("cpu")
        return self._device

    def _encoder_identity(self) -> str:
        """The encoder's part of every key: weights, config, code, device kind and autocast (hashed once per stage, but autocast)."""
        rp = self._rp
        if self._encoder_part is None:
            encoder = rp.encoder
            spec = rp.composition.encoder
            provenance = rp.plugins.registry.get("encoder", spec.name).provenance
            # rp._content_hash remembers the hash while the weights stay as they were: checkpoint saves hash the same modules.
            hashed = getattr(rp, "_content_hash", content_hash)
            described = {
                "format": FORMAT,
                "encoder": spec.model_dump(mode="json"),
                "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
                "plugin": [provenance.plugin, provenance.distribution, provenance.version],
                "weights": [hashed(module) for module in _encoder_modules(encoder)],
                "device": self.device.type,
            }
            self._encoder_part = json.dumps(described, sort_keys=True)
        kind = self.device.type
        autocast = torch.is_autocast_enabled(kind) and str(torch.get_autocast_dtype(kind))
        return f"{self._encoder_part}|autocast={autocast}"

    def keys(self, groups: Sequence[Sequence[Image]], prompts: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """The conditional and the unconditional key of every group (``prompts``: one per group, or ``None``)."""
        encoder = self._encoder_identity()
        conditional, unconditional = [], []
        for b, group in enumerate(groups):
            sample = hashlib.sha256()
            if prompts is None:
                sample.update(b"no prompt\0")
            else:
                text = prompts[b].encode("utf-8")
                sample.update(b"prompt %d\0" % len(text) + text)
            sample.update(b"%d images\0" % len(group))
            for image in group:
                sample.update(f"{image.mode} {image.size[0]}x{image.size[1]}\0".encode())
                sample.update(image.tobytes())
            for kind, out in (("conditional", conditional), ("unconditional", unconditional)):
                out.append(hashlib.sha256(f"{encoder}|{kind}|{sample.hexdigest()}".encode()).hexdigest())
        return conditional, unconditional

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    # -- reading and writing --------------------------------------------------------------------

    def fetch(self, keys: Sequence[str], compute: Callable[[list[int]], ReferenceEncoding]) -> ReferenceEncoding:
        """The encodings of ``keys`` as one batch: the stored rows, and for the rows the folder lacks, ``compute(every row)``'s (then stored).

        The whole batch is computed, not only the rows missing, so that a row's encoding never depends
        on which other rows happened to be stored (kernels may round a smaller batch differently).
        """
        rows: list[ReferenceEncoding | None] = [self._read(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute(list(range(len(keys))))
            self._device = fresh.tokens.device  # the truth, for the rows read from now on
            for i in missing:
                rows[i] = _unpadded(fresh, i)
                self._write(keys[i], rows[i])
        return ReferenceEncoding.concat_batches([row.to(self.device) for row in rows if row is not None])

    def _read(self, key: str) -> ReferenceEncoding | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, it is a miss
            self._bad(path, f"cannot be read ({type(exc).__name__}: {exc})")
            return None
        problem = _problem(tensors, metadata, key, getattr(self._rp.encoder, "embedding_dim", None))
        if problem is not None:
            self._bad(path, problem)
            return None
        return ReferenceEncoding(*(tensors[name][None].to(self.device) for name in _TENSORS))

    def _write(self, key: str, row: ReferenceEncoding) -> None:
        if not self._writable:
            return
        tensors = {name: getattr(row, name)[0].detach().contiguous().cpu() for name in _TENSORS}
        try:
            write_safetensors(self.path(key), tensors, {"format": FORMAT, "key": key, "sha256": tensors_hash(tensors)})
        except (RefcondError, OSError) as exc:  # a full disk or a read-only folder slows training down, it does not stop it
            self._writable = False
            self._warn_once("write", f"encoding cache: {exc} Training goes on without storing encodings for the rest of this stage.")

    def _bad(self, path: Path, problem: str) -> None:
        self.bad += 1
        self._warn_once("bad", f"encoding cache: {path} {problem}; it is recomputed and overwritten (further bad files in this stage are, silently).")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _unpadded(encoding: ReferenceEncoding, row: int) -> ReferenceEncoding:
    """Row ``row`` of a batch without its padding, as a batch of one."""
    mask = encoding.mask[row]
    tokens = encoding.tokens[row][mask.to(encoding.tokens.device)]
    source = encoding.source[row][mask.to(encoding.source.device)]
    return ReferenceEncoding(tokens[None], mask[mask][None], source[None])


def _problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str], key: str, dim: Any) -> str | None:
    """Why a read file is not a cached encoding of ``key`` (``None`` when it is one)."""
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        return f"is not the encoding cache's file for this key (format {metadata.get('format')!r}, key {metadata.get('key')!r})"
    if sorted(tensors) != sorted(_TENSORS):
        return f"holds tensors {sorted(tensors)}, not {list(_TENSORS)}"
    tokens, mask, source = (tensors[name] for name in _TENSORS)
    if tokens.ndim != 2 or not tokens.is_floating_point() or mask.dtype != torch.bool or source.dtype != torch.long:
        return f"holds tokens {tokens.dtype} {tuple(tokens.shape)}, mask {mask.dtype}, source {source.dtype}: not an encoding row"
    if mask.shape != tokens.shape[:1] or source.shape != tokens.shape[:1] or not bool(mask.all()):
        return f"holds {tokens.shape[0]} tokens but a mask {tuple(mask.shape)} and a source {tuple(source.shape)}"
    if isinstance(dim, int) and tokens.shape[1] != dim:
        return f"holds tokens of size {tokens.shape[1]}, but the encoder's are {dim}"
    if metadata.get("sha256") != tensors_hash(tensors):
        return "does not match its checksum"
    return None


class _CachingEncoder:
    """The frozen encoder, its ``encode`` and ``encode_unconditional`` read through the cache; every other attribute is the encoder's."""

    def __init__(self, cache: EncodingCache, encoder: Any):
        self._cache = cache
        self._encoder = encoder
        # encode_unconditional is not given the prompts: the keys of the groups encode() last saw are kept for it.
        self._last: tuple[Sequence[Sequence[Image]], list[str]] | None = None

    def __getattr__(self, name: str) -> Any:
        if name in ("_cache", "_encoder", "_last"):  # not set yet (a copy being made): no endless lookup
            raise AttributeError(name)
        return getattr(self._encoder, name)

    def encode(self, references: Sequence[Sequence[Image]], prompts: Sequence[str] | None = None) -> ReferenceEncoding:
        conditional, unconditional = self._cache.keys(references, prompts)
        self._last = (references, unconditional)

        def compute(rows: list[int]) -> ReferenceEncoding:
            groups = [references[i] for i in rows]
            if prompts is None:
                return self._encoder.encode(groups)
            return self._encoder.encode(groups, prompts=[prompts[i] for i in rows])

        return self._cache.fetch(conditional, compute)

    def encode_unconditional(self, encoding: ReferenceEncoding, references: Sequence[Sequence[Image]]) -> ReferenceEncoding:
        if self._last is None or self._last[0] is not references:  # groups encode() did not see: no key, the encoder computes it
            return self._encoder.encode_unconditional(encoding, references)
        keys = self._last[1]

        def compute(rows: list[int]) -> ReferenceEncoding:
            part = ReferenceEncoding(*(_rows(getattr(encoding, name), rows) for name in _TENSORS))
            return self._encoder.encode_unconditional(part, [references[i] for i in rows])

        return self._cache.fetch(keys, compute)


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))
