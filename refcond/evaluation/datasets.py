"""Evaluation sets: what to generate, from which references, with which prompt and seed.

Two layouts are read into the same list of :class:`EvalSample`:

- **JSONL**, one sample a line: ``{"id": "dog-0", "references": ["dog/1.jpg", "dog/2.jpg"],
  "prompt": "a dog on the beach", "seed": 7, "captions": ["...", "..."]}``. ``id`` and ``seed`` are
  optional (the line number, and a seed derived from the run's seed and the id); ``captions``
  (one per reference) is optional. Paths are relative to the file. Blank lines and lines that
  start with ``#`` are skipped.
- **DreamBench-style folders**: one folder of images per subject, and a prompt list (a text file,
  one prompt per line, ``{}`` standing for the subject's name with underscores as spaces, or with
  ``{0}``/``{1}`` as DreamBooth's ``prompts_and_classes.txt`` writes them: the subject and its
  class). Every subject is paired with every prompt.

Everything is checked when the set is read, before any model loads; a bad line is a
:class:`~refcond.errors.ConfigError` naming the file, the line and the field. Images are read
later, when a sample is generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from refcond.config import ComponentConfig, validate_config
from refcond.errors import ConfigError

#: Image suffixes a DreamBench subject folder's files may have.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Largest evaluation set read (lines or subject x prompt pairs).
MAX_SAMPLES = 1_000_000
#: Largest line of a JSONL evaluation set.
MAX_LINE_BYTES = 1 << 20
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class EvalSample:
    """One sample of an evaluation set: images are generated from its references and prompt."""

    #: A name unique in the set: it names the sample's images (letters, digits, ``_``, ``.``, ``-``).
    id: str
    #: The reference images' paths, in order.
    references: tuple[Path, ...]
    #: The prompt of every image of the sample.
    prompt: str
    #: The seed of the sample's first image (image ``k`` uses ``seed + k``); ``None`` = derived from the run's seed.
    seed: int | None = None
    #: One caption per reference, for compositions that read them; empty when none were given.
    captions: tuple[str, ...] = ()


class _Record(ComponentConfig):
    """One JSONL line, as written."""

    id: str | None = Field(default=None, description="A unique name (letters, digits, _ . -), at most 128 characters.")
    references: list[str] = Field(min_length=1, max_length=1024, description="Reference image paths, relative to the file.")
    prompt: str = Field(max_length=10_000, description="The prompt.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Seed of the sample's first image.")
    captions: list[str] | None = Field(default=None, max_length=1024, description="One caption per reference.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        if value is not None and not _ID.match(value):
            raise ValueError(f"{value!r} is not a sample id: use 1 to 128 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("references")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path or "\0" in path:
                raise ValueError(f"{path!r} is not a path")
        return value


def read_eval_set(path: str | Path) -> list[EvalSample]:
    """The samples of a JSONL evaluation set (see the module docstring)."""
    path = Path(path)
    where = str(path)
    try:
        if not path.is_file():
            raise ConfigError(f"evaluation set {where!r} is not a file.")
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read evaluation set {where!r}: {exc.strerror or exc}") from None
    samples: list[EvalSample] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split(b"\n"), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) > MAX_LINE_BYTES:
            raise ConfigError(f"{where}:{number}: a line of more than {MAX_LINE_BYTES} bytes.")
        try:
            data = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"{where}:{number}: not a JSON line: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}:{number}: a sample is a JSON object with references and a prompt, got {type(data).__name__}.")
        record = validate_config(_Record, data, where=f"{where}:{number}")
        if record.captions is not None and len(record.captions) != len(record.references):
            raise ConfigError(f"{where}:{number}: {len(record.captions)} captions for {len(record.references)} references; give one per reference.")
        sample_id = record.id or f"{number:06d}"
        if sample_id in seen:
            raise ConfigError(f"{where}:{number}: id {sample_id!r} is used on line {seen[sample_id]} too; ids name the images and must be unique.")
        seen[sample_id] = number
        references = tuple(_resolve(path.parent, p) for p in record.references)
        samples.append(EvalSample(sample_id, references, record.prompt, record.seed, tuple(record.captions or ())))
        if len(samples) > MAX_SAMPLES:
            raise ConfigError(f"{where}: more than {MAX_SAMPLES} samples.")
    if not samples:
        raise ConfigError(f"evaluation set {where!r} has no samples: write one JSON object a line.")
    return samples


def read_dreambench(folder: str | Path, prompts: str | Path | Sequence[str], *, max_references: int | None = None) -> list[EvalSample]:
    """Every subject folder of ``folder`` with every prompt (see the module docstring).

    :param prompts: a text file of prompts (one a line) or the prompts themselves.
    :param max_references: use at most this many of a subject's images (sorted by name).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"DreamBench folder {str(folder)!r} is not a folder of subject folders.")
    if isinstance(prompts, (str, Path)):
        try:
            lines = Path(prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the prompt list {str(prompts)!r}: {exc}") from None
        texts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        texts = [str(p) for p in prompts]
    if not texts:
        raise ConfigError("the prompt list is empty: give at least one prompt ('a photo of {}').")
    subjects = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples: list[EvalSample] = []
    for subject in subjects:
        images = sorted(p for p in subject.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if max_references is not None:
            images = images[:max_references]
        if not images:
            continue
        name = subject.name.replace("_", " ")
        slug = re.sub(r"[^A-Za-z0-9_.-]", "-", subject.name)[:100]
        for i, text in enumerate(texts):
            samples.append(EvalSample(f"{slug}-{i:03d}", tuple(images), text.replace("{}", name).replace("{0}", name).replace("{1}", name)))
    if not samples:
        raise ConfigError(f"DreamBench folder {str(folder)!r} has no subject folder with images ({', '.join(IMAGE_SUFFIXES)}).")
    if len(samples) > MAX_SAMPLES:
        raise ConfigError(f"DreamBench folder {str(folder)!r}: more than {MAX_SAMPLES} subject x prompt pairs.")
    return samples


def load_eval_set(source: str | Path | Sequence[EvalSample] | Sequence[dict[str, Any]]) -> list[EvalSample]:
    """Samples from a JSONL file, a DreamBench folder (its prompts in ``prompts.txt``), or a list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return read_dreambench(path, path / "prompts.txt")
        return read_eval_set(path)
    samples = list(source)
    if not samples:
        raise ConfigError("the evaluation set is empty.")
    if all(isinstance(s, EvalSample) for s in samples):
        return samples  # type: ignore[return-value]
    raise ConfigError("an evaluation set is a JSONL file, a DreamBench folder or a list of refcond.evaluation.EvalSample.")


def _resolve(base: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else base / candidate
