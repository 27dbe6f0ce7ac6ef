"""Label tables: label value -> name, colour and Slicer/DICOM terminology, kept as data files.

The tables live in ``gvsl/data/labels/*.tsv`` (tab-separated, ``#`` comment lines, a header
row) with the columns::

    value  name  r  g  b  category  type  type_modifier

``category``, ``type`` and ``type_modifier`` are coded concepts ``scheme^value^meaning``
(e.g. ``SCT^89278009^Putamen``); an empty ``type_modifier`` means none. Tables:

* ``heart``    the 7 MM-WHS CT structures (205, 420, 500, 550, 600, 820, 850)
* ``coronary`` 1 = coronary artery tree (ASOCA, binary)
* ``brain``    the 28 FreeSurfer aseg labels used with CANDI
* ``freesurfer-aseg-extra``  other aseg labels users may bring (5/44 Inf-Lat-Vent,
  26/58 Accumbens-area, 31/63 choroid plexus); not a task table, but
  :meth:`LabelTable.from_values` accepts any value of ``brain`` or of this file, so a user's
  own FreeSurfer aseg subset becomes a table without writing a file.

A user's own table is any TSV file with the same columns (``LabelTable.load(path)``).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

from gvsl.errors import GVSLError

DATA_DIR = Path(__file__).resolve().parent / "data" / "labels"
TASKS = ("heart", "coronary", "brain")
ASEG_TABLES = ("brain", "freesurfer-aseg-extra")
COLUMNS = ("value", "name", "r", "g", "b", "category", "type", "type_modifier")

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"


class LabelError(GVSLError, ValueError):
    """A label table or label value that cannot be used, with what is wrong and what to do."""


def _check_code(text: str, column: str, where: str, allow_empty: bool = False) -> str:
    text = text.strip()
    if not text and allow_empty:
        return ""
    if text.count("^") != 2 or not text.split("^")[1] or not text.split("^")[2]:
        raise LabelError(f"{where}: column '{column}' must be a code 'scheme^value^meaning' "
                         f"(e.g. SCT^89278009^Putamen), got {text!r}")
    return text


@dataclass(frozen=True)
class Label:
    """One label: its integer value in a label map, name, display colour and terminology.

    ``category``/``type``/``type_modifier`` are ``scheme^value^meaning`` strings
    (``type_modifier`` may be empty).
    """
    value: int
    name: str
    color_rgb: Tuple[int, int, int]
    category: str
    type: str
    type_modifier: str = ""

    @property
    def color_float(self) -> Tuple[float, float, float]:
        """Colour as three floats in [0, 1] (Slicer segments use these)."""
        return tuple(c / 255.0 for c in self.color_rgb)

    def terminology_tag(self) -> str:
        """Slicer's 7-part ``TerminologyEntry`` tag value.

        ``context~category~type~typeModifier~regionContext~region~regionModifier`` with empty
        codes written ``^^``, e.g. ``Segmentation category and type - DICOM master list~
        SCT^123037004^Anatomical Structure~SCT^89278009^Putamen~SCT^7771000^Left~
        Anatomic codes - DICOM master list~^^~^^``.
        """
        parts = [TERMINOLOGY_CONTEXT, self.category, self.type, self.type_modifier or "^^",
                 REGION_CONTEXT, "^^", "^^"]
        return "~".join(parts)


@dataclass
class LabelTable:
    """An ordered list of :class:`Label` (by value) with a name (``heart``, a file stem, ...)."""
    name: str
    labels: List[Label] = field(default_factory=list)

    def __post_init__(self):
        self.labels = sorted(self.labels, key=lambda lab: lab.value)
        seen: Dict[int, Label] = {}
        for lab in self.labels:
            if lab.value <= 0:
                raise LabelError(f"label table '{self.name}': value {lab.value} ({lab.name}) must be "
                                 "a positive integer; 0 is the background and is not listed.")
            if lab.value in seen:
                raise LabelError(f"label table '{self.name}': value {lab.value} is listed twice "
                                 f"({seen[lab.value].name!r} and {lab.name!r}); keep one.")
            seen[lab.value] = lab

    @property
    def values(self) -> List[int]:
        """Label values in increasing order (background 0 excluded)."""
        return [lab.value for lab in self.labels]

    @property
    def by_value(self) -> Dict[int, Label]:
        return {lab.value: lab for lab in self.labels}

    @property
    def names(self) -> List[str]:
        return [lab.name for lab in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    def __getitem__(self, value: int) -> Label:
        try:
            return self.by_value[int(value)]
        except KeyError:
            raise LabelError(f"label table '{self.name}' has no value {value}; "
                             f"its values are {self.values}") from None

    # ------------------------------------------------------------------ reading / writing
    @classmethod
    def parse(cls, text: str, name: str, where: str = "") -> "LabelTable":
        """Parse TSV text (comment lines start with '#')."""
        where = where or name
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise LabelError(f"{where}: no rows; expected a header '{chr(9).join(COLUMNS)}' and one "
                             "row per label.")
        reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter="\t")
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelError(f"{where}: missing column(s) {missing}; the header must be the "
                             f"tab-separated columns {list(COLUMNS)}.")
        labels = []
        for i, row in enumerate(reader, start=2):
            loc = f"{where} row {i}"
            try:
                value = int(row["value"])
                rgb = tuple(int(row[c]) for c in ("r", "g", "b"))
            except (TypeError, ValueError):
                raise LabelError(f"{loc}: value and r, g, b must be integers, got "
                                 f"{[row.get(c) for c in ('value', 'r', 'g', 'b')]}") from None
            if not all(0 <= c <= 255 for c in rgb):
                raise LabelError(f"{loc}: colour {rgb} must be three integers in 0..255")
            labels.append(Label(
                value=value, name=(row["name"] or "").strip() or f"label {value}", color_rgb=rgb,
                category=_check_code(row["category"] or "", "category", loc),
                type=_check_code(row["type"] or "", "type", loc),
                type_modifier=_check_code(row["type_modifier"] or "", "type_modifier", loc,
                                          allow_empty=True)))
        return cls(name, labels)

    @classmethod
    def load(cls, name_or_path: Union[str, Path]) -> "LabelTable":
        """A bundled table by name (``heart``, ``coronary``, ``brain``, ``freesurfer-aseg-extra``)
        or a TSV file path."""
        path = Path(name_or_path)
        bundled = DATA_DIR / f"{name_or_path}.tsv"
        if isinstance(name_or_path, str) and "/" not in name_or_path and bundled.is_file():
            path = bundled
        if not path.is_file():
            choices = sorted(p.stem for p in DATA_DIR.glob("*.tsv"))
            raise LabelError(f"label table {str(name_or_path)!r} not found: pass one of {choices} "
                             "or a .tsv file with the columns " + ", ".join(COLUMNS))
        name = path.name[:-4] if path.name.endswith(".tsv") else path.stem
        return cls.parse(path.read_text(encoding="utf-8"), name, where=str(path))

    def to_tsv(self) -> str:
        """The table as TSV text (header + rows), readable by :meth:`parse`."""
        rows = ["\t".join(COLUMNS)]
        for lab in self.labels:
            rows.append("\t".join([str(lab.value), lab.name, *map(str, lab.color_rgb), lab.category,
                                   lab.type, lab.type_modifier]))
        return "\n".join(rows) + "\n"

    @classmethod
    def from_values(cls, values: Iterable[int], name: str = "freesurfer-aseg") -> "LabelTable":
        """A FreeSurfer aseg subset: every value must be in ``brain.tsv`` or
        ``freesurfer-aseg-extra.tsv`` (0, the background, is ignored)."""
        known: Dict[int, Label] = {}
        for table in ASEG_TABLES:
            known.update(cls.load(table).by_value)
        wanted = sorted({int(v) for v in values} - {0})
        if not wanted:
            raise LabelError("no label values given (only background 0); a label map needs at least "
                             "one structure.")
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise LabelError(f"FreeSurfer aseg value(s) {unknown} are not in the bundled tables "
                             f"(known: {sorted(known)}); write a .tsv label table for them "
                             f"(columns {', '.join(COLUMNS)}) and pass its path.")
        return cls(name, [known[v] for v in wanted])

    def subset(self, values: Sequence[int]) -> "LabelTable":
        """The labels of ``values`` only (each must be in this table)."""
        return LabelTable(self.name, [self[v] for v in values])


def load_task_table(task: str) -> LabelTable:
    """The label table of a downstream task: ``heart``, ``coronary`` or ``brain``."""
    if task not in TASKS:
        raise LabelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (or load your "
                         "own table with LabelTable.load(path))")
    return LabelTable.load(task)
