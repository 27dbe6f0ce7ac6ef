"""The per-user GVSL models folder and the "current GVSL model" setting (no Qt, fully offline).

One folder per user, outside Slicer's per-release extension folder, so models survive Slicer
upgrades and are never re-downloaded:

* ``$GVSL_MODELS_DIR`` when set, else
* Windows ``%LOCALAPPDATA%\\GVSL\\models``; macOS ``~/Library/Application Support/GVSL/models``;
  Linux ``$XDG_DATA_HOME/GVSL/models`` (``~/.local/share/GVSL/models``).

Layout: ``<root>/<id>/model.pt`` (the weights file, copied in atomically) + ``<root>/<id>/model.json``
(metadata: id, name, kind, task, labels, preprocessing, steps, date, sha256, source, original
path, model_config) and ``<root>/current.json`` ({kind: id}: the current model per kind, e.g. the
pre-training checkpoint the Registration panel offers first). Every file arrives through
:func:`gvsl.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``), so a broken file or a
file of the wrong kind is refused with a message before anything is copied.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

ENV_VAR = "GVSL_MODELS_DIR"
KINDS = ("pretrain", "segmentation")


class ModelStoreError(ValueError):
    """A weights file that cannot be imported, or an unknown model; the message says why."""


def default_models_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "GVSL" / "models"


def sha256_of(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelEntry:
    """One model of the folder (the fields of its model.json)."""
    id: str
    name: str
    kind: str
    path: str
    sha256: str
    date: str
    source: str = "gvsl"
    task: str = ""
    labels: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    steps: int = 0
    model_config: dict = field(default_factory=dict)
    original_path: str = ""

    def describe(self) -> str:
        what = f"{self.kind}" + (f" ({self.task})" if self.task else "")
        return f"{self.name} - {what}, {self.steps} steps, {self.date[:10]}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "model"


class ModelStore:
    """The models folder at ``root`` (default :func:`default_models_dir`)."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_models_dir()

    # -- listing ----------------------------------------------------------------------------
    def list(self, kind: Optional[str] = None) -> List[ModelEntry]:
        """Every model (newest first), optionally of one kind; unreadable entries are skipped."""
        entries = []
        if self.root.is_dir():
            for meta in self.root.glob("*/model.json"):
                try:
                    data = json.loads(meta.read_text(encoding="utf-8"))
                    entry = ModelEntry(**{k: v for k, v in data.items() if k in ModelEntry.__dataclass_fields__})
                except (OSError, ValueError, TypeError):
                    continue
                if Path(entry.path).exists() and (kind is None or entry.kind == kind):
                    entries.append(entry)
        return sorted(entries, key=lambda e: e.date, reverse=True)

    def get(self, model_id: str) -> ModelEntry:
        for entry in self.list():
            if entry.id == model_id:
                return entry
        raise ModelStoreError(f"no model '{model_id}' in {self.root}")

    # -- adding -----------------------------------------------------------------------------
    def add(self, path, name: Optional[str] = None, expected_kind: Optional[str] = None,
            make_current: bool = False) -> ModelEntry:
        """Validate ``path`` and copy it in (atomically); the same file twice gives the same entry.

        expected_kind: "pretrain" | "segmentation" | None (any). A file of another kind, a
        truncated/corrupt file or one that is not GVSL weights raises :class:`ModelStoreError`.
        """
        from gvsl.checkpoint import CheckpointError, atomic_write, load_checkpoint, model_from_checkpoint
        src = Path(path)
        try:
            ckpt = load_checkpoint(src)
            kind = ckpt.get("kind", "pretrain")
            if kind == "pretrain":
                model_from_checkpoint(ckpt, src)  # validates every key and shape
        except CheckpointError as exc:
            raise ModelStoreError(f"cannot import {src.name}: {exc}") from None
        if expected_kind is not None and kind != expected_kind:
            hint = {"pretrain": "a pre-training checkpoint (gvsl pretrain / the GVSL Pretraining module) or "
                                "the published GVSL weights",
                    "segmentation": "a fine-tuned segmentation model (gvsl finetune / the GVSL Segmentation "
                                    "module)"}.get(expected_kind, expected_kind)
            raise ModelStoreError(f"{src.name} is a '{kind}' model, but {hint} is needed here.")
        digest = sha256_of(src)
        for entry in self.list():
            if entry.sha256 == digest:
                if make_current:
                    self.set_current(entry)
                return entry
        name = name or (src.parent.name if src.stem in ("gvsl_final", "gvsl_last", "model") else src.stem)
        model_id = f"{_slug(name)}-{digest[:8]}"
        folder = self.root / model_id
        folder.mkdir(parents=True, exist_ok=True)
        target = atomic_write(folder / "model.pt", lambda tmp: shutil.copyfile(src, tmp))
        entry = ModelEntry(
            id=model_id, name=name, kind=kind, path=str(target), sha256=digest,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=str(ckpt.get("source", "gvsl")), task=str(ckpt.get("task", "") or ""),
            labels=dict(ckpt.get("labels") or {}) if isinstance(ckpt.get("labels"), dict) else {},
            preprocessing=dict(ckpt.get("preprocessing") or {}), steps=int(ckpt.get("step", 0)),
            model_config=dict(ckpt.get("model_config") or {}), original_path=str(src.resolve()))
        self._write_json(folder / "model.json", asdict(entry))
        if make_current:
            self.set_current(entry)
        return entry

    def import_weights(self, path, expected_kind: Optional[str] = "pretrain", name: Optional[str] = None) -> ModelEntry:
        """"Import weights...": the published GVSL weights or any GVSL checkpoint, validated."""
        return self.add(path, name=name, expected_kind=expected_kind)

    def remove(self, model_id: str) -> None:
        entry = self.get(model_id)
        shutil.rmtree(Path(entry.path).parent, ignore_errors=True)
        current = self._current_ids()
        changed = {k: v for k, v in current.items() if v != model_id}
        if changed != current:
            self._write_json(self.root / "current.json", changed)

    # -- current model ----------------------------------------------------------------------
    def _current_ids(self) -> dict:
        try:
            return dict(json.loads((self.root / "current.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return {}

    def set_current(self, entry_or_id) -> ModelEntry:
        entry = entry_or_id if isinstance(entry_or_id, ModelEntry) else self.get(entry_or_id)
        ids = self._current_ids()
        ids[entry.kind] = entry.id
        self._write_json(self.root / "current.json", ids)
        return entry

    def current(self, kind: str = "pretrain") -> Optional[ModelEntry]:
        """The current model of ``kind`` (None when unset or deleted)."""
        model_id = self._current_ids().get(kind)
        if not model_id:
            return None
        try:
            return self.get(model_id)
        except ModelStoreError:
            return None

    def current_path(self, kind: str = "pretrain") -> str:
        entry = self.current(kind)
        return entry.path if entry else ""

    def _write_json(self, path: Path, data) -> None:
        from gvsl.checkpoint import atomic_write_text
        atomic_write_text(path, json.dumps(data, indent=2))
