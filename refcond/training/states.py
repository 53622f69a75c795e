"""Training states on disk: saved every K steps, atomically, the last M kept; ``--resume latest`` finds the newest.

A state is a folder ``states/<stage index>-<stage name>-step-<step>/`` holding what
``accelerate.save_state`` writes (the trained weights, the optimizer, the learning-rate schedule,
the random generators) and ``trainer.json`` (where the run stands). It is written under a
temporary name and renamed into place, so a run killed at any moment leaves only whole states.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from refcond.errors import ConfigError

STATES = "states"
TRAINER_FILE = "trainer.json"
_NAME = re.compile(r"^(?P<stage>\d{2})-(?P<name>[A-Za-z0-9_.-]+)-step-(?P<step>\d{8})$")


@dataclass(frozen=True)
class Position:
    """Where a run stands: after ``step`` optimizer steps of stage ``stage`` (0-based)."""

    stage: int
    stage_name: str
    step: int
    skipped: int = 0

    def folder_name(self) -> str:
        return f"{self.stage:02d}-{self.stage_name}-step-{self.step:08d}"


def save_state(output: Path, position: Position, write: Callable[[Path], None], keep_last: int) -> Path:
    """Write a state with ``write(folder)`` into a temporary folder, rename it into place, prune old ones."""
    root = output / STATES
    root.mkdir(parents=True, exist_ok=True)
    final = root / position.folder_name()
    tmp = root / f".{position.folder_name()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        (tmp / TRAINER_FILE).write_text(json.dumps(asdict(position), indent=2) + "\n", encoding="utf-8")
        if final.exists():  # the same step saved again (a resumed run that was killed right after saving)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_states(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_states(output: Path) -> list[Path]:
    """Whole states of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(output) / STATES
    if not root.is_dir():
        return []
    states = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(states, key=lambda p: (int(_NAME.match(p.name)["stage"]), int(_NAME.match(p.name)["step"])))  # type: ignore[index]


def find_state(output: Path, resume: str) -> Path:
    """``"latest"`` (the newest state under ``output``) or a state folder."""
    if resume == "latest":
        states = list_states(output)
        if not states:
            raise ConfigError(f"--resume latest: {str(Path(output) / STATES)!r} holds no saved training state; start without --resume.")
        return states[-1]
    folder = Path(resume)
    if not (folder / TRAINER_FILE).is_file():
        raise ConfigError(f"--resume {resume!r} is not a training state (a folder with {TRAINER_FILE}); give 'latest' or a folder under {STATES}/.")
    return folder


def read_position(folder: Path) -> Position:
    try:
        data = json.loads((folder / TRAINER_FILE).read_text(encoding="utf-8"))
        return Position(int(data["stage"]), str(data["stage_name"]), int(data["step"]), int(data.get("skipped", 0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"training state {str(folder)!r}: {TRAINER_FILE} is unreadable ({exc}); resume from another state.") from None
