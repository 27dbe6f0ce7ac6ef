"""Readers for the public datasets of the paper's transfer protocol, and for a plain folder.

Each reader takes the dataset's root folder (``gvsl protocol --data DIR``) and returns a
:class:`Dataset`: sorted ``(case_id, image_path, label_path)`` triples plus how its labels are
read (unknown values to background, a value remapping) and notes for the report. Layouts (the
files as the datasets are distributed; every search below is recursive under ``DIR`` unless
said otherwise):

* ``mmwhs`` (MM-WHS CT, heart): ``ct_train_1001_image.nii.gz`` + ``ct_train_1001_label.nii.gz``
  (same folder or anywhere under DIR), also ``ct_test_*_image`` / ``_label`` when the test
  labels are present. Any prefix before ``ct_`` is kept in the case id. A ``ct_test`` image
  without a label is skipped with a note (MM-WHS withheld its test labels); a ``ct_train`` image
  without its label, or a label without its image, is an error naming the file.
* ``asoca`` (coronary): ``Normal/CTCA/Normal_1.nrrd`` + ``Normal/Annotations/Normal_1.nrrd`` and
  ``Diseased/CTCA/Diseased_N.nrrd`` + ``Diseased/Annotations/Diseased_N.nrrd`` (any ``CTCA``
  folder with an ``Annotations`` folder beside it; a ``CTCA`` folder without one, such as the
  unlabelled test set, is left out with a note). The annotations are binary (1 = artery); the
  ``coronary`` table's value is 1 too, so no remap is needed, but a table with another single
  value gets ``{1: value}`` (:func:`asoca_remap`).
* ``candi`` (brain): ``<group>/<subject>/<subject>_procimg.nii.gz`` + ``<subject>_seg.nii.gz``
  (groups BPDwithPsy, BPDwithoutPsy, HC, SS). CANDI segmentations carry more FreeSurfer labels
  than the 28 of the ``brain`` table, so this layout maps unknown labels to background
  (``ignore_unknown=True``) and says so in its notes.
* ``plain``: ``DIR/images/<name>`` + ``DIR/labels/<name>`` matched by file name (not recursive).

:func:`read_dataset` with ``layout="auto"`` detects the layout: ``plain`` when ``images/`` and
``labels/`` exist, else the one dataset layout whose image files are present; none -> one error
listing all four expected layouts; two -> an error asking for ``--layout``. Zero cases is an
error. Nothing here reads voxels (file names only); imports no torch and no SimpleITK.

:func:`make_splits` splits the cases train/val/test by a rule such as the paper's
(:data:`PAPER_SPLITS`: heart 15/5/rest, coronary 15/5/20, brain 40/20/43; ``rest`` = all remaining,
at least 1): a NumPy ``default_rng(seed)`` permutation of the cases sorted by id.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gvsl.errors import GVSLError

LAYOUTS = ("mmwhs", "asoca", "candi", "plain")
PAPER_SPLITS = {"heart": "15/5/rest", "coronary": "15/5/20", "brain": "40/20/43"}  # train/val/test
TASK_OF_LAYOUT = {"mmwhs": "heart", "asoca": "coronary", "candi": "brain"}
CANDI_GROUPS = ("BPDwithPsy", "BPDwithoutPsy", "HC", "SS")
ASOCA_GROUPS = ("Normal", "Diseased")
ASOCA_ARTERY_VALUE = 1
EXPECTED = {
    "mmwhs": "MM-WHS CT: ct_train_1001_image.nii.gz + ct_train_1001_label.nii.gz (also ct_test_*), anywhere under DIR",
    "asoca": "ASOCA: Normal/CTCA/Normal_1.nrrd + Normal/Annotations/Normal_1.nrrd, "
             "Diseased/CTCA/Diseased_1.nrrd + Diseased/Annotations/Diseased_1.nrrd",
    "candi": "CANDI: <group>/<subject>/<subject>_procimg.nii.gz + <subject>_seg.nii.gz "
             f"(groups {', '.join(CANDI_GROUPS)})",
    "plain": "plain: DIR/images/<name>.nii.gz + DIR/labels/<name>.nii.gz, matched by file name",
}
PathLike = Union[str, os.PathLike]

_MMWHS_IMAGE = re.compile(r"^(?P<id>.*ct_(?P<part>train|test)_\d+)_image(?P<ext>\.nii(?:\.gz)?)$")
_MMWHS_LABEL = re.compile(r"^(?P<id>.*ct_(?P<part>train|test)_\d+)_label(?P<ext>\.nii(?:\.gz)?)$")
_CANDI_IMAGE = re.compile(r"^(?P<id>.+)_procimg(?P<ext>\.nii(?:\.gz)?)$")
_CANDI_LABEL = re.compile(r"^(?P<id>.+)_seg(?P<ext>\.nii(?:\.gz)?)$")


class DatasetLayoutError(GVSLError, ValueError):
    """The data folder does not match the layout; the message names the expected file names."""


class SplitError(GVSLError, ValueError):
    """A split rule that is malformed or needs more cases than there are; the message says what to pass."""


@dataclass
class Dataset:
    """The cases of one data folder: ``cases`` sorted by case id (natural order)."""
    layout: str
    root: Path
    cases: List[Tuple[str, Path, Path]]
    ignore_unknown: bool = False          # label values outside the task's table -> background
    remap: Dict[int, int] = field(default_factory=dict)  # source value -> table value (0 = background)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "root": str(self.root), "n_cases": len(self.cases),
                "ignore_unknown_labels": self.ignore_unknown, "remap": {str(k): v for k, v in self.remap.items()},
                "notes": list(self.notes)}


def natural_key(text: str) -> list:
    """Sort key with digit runs compared as numbers (Normal_2 < Normal_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _sorted(cases: List[Tuple[str, Path, Path]]) -> List[Tuple[str, Path, Path]]:
    return sorted(cases, key=lambda c: natural_key(c[0]))


def _walk_files(root: Path) -> List[Path]:
    """Every file under ``root`` (hidden folders and files skipped), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in files if not f.startswith("."))
    return sorted(found)


def _check_root(root: PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"--data {root} is not a folder; pass the dataset's root folder.")
    return root


def _unique_case_ids(cases, layout: str) -> None:
    seen: Dict[str, Path] = {}
    for cid, img, _ in cases:
        if cid in seen:
            raise DatasetLayoutError(f"{layout} layout: case '{cid}' appears twice ({seen[cid]} and {img}); "
                                     "keep one copy of each case under --data.")
        seen[cid] = img


def _no_cases(layout: str, root: Path) -> DatasetLayoutError:
    return DatasetLayoutError(f"--data {root} holds no case of the {layout} layout; expected {EXPECTED[layout]}.")


# ---------------------------------------------------------------------------------------
# the readers
# ---------------------------------------------------------------------------------------
def read_mmwhs(root: PathLike) -> Dataset:
    root = _check_root(root)
    files = _walk_files(root)
    images = [(m, p) for p in files for m in [_MMWHS_IMAGE.match(p.name)] if m]
    labels: Dict[str, List[Path]] = {}
    for p in files:
        m = _MMWHS_LABEL.match(p.name)
        if m:
            labels.setdefault(m.group("id"), []).append(p)
    cases, notes, skipped = [], [], []
    image_ids = set()
    for m, img in images:
        cid = m.group("id")
        image_ids.add(cid)
        found = labels.get(cid, [])
        if len(found) > 1:
            beside = [p for p in found if p.parent == img.parent]
            found = beside if len(beside) == 1 else found
        if len(found) > 1:
            raise DatasetLayoutError(f"mmwhs layout: {img.name} has {len(found)} label maps "
                                     f"({', '.join(str(p) for p in found)}); keep one.")
        if not found:
            if m.group("part") == "test":
                skipped.append(img.name)
                continue
            raise DatasetLayoutError(
                f"mmwhs layout: {img} has no label map; expected {cid}_label{m.group('ext')} beside it "
                "(MM-WHS pairs are ct_train_1001_image.nii.gz + ct_train_1001_label.nii.gz).")
        cases.append((cid, img, found[0]))
    orphans = sorted(str(p) for cid, ps in labels.items() if cid not in image_ids for p in ps)
    if orphans:
        raise DatasetLayoutError(f"mmwhs layout: label map {orphans[0]} has no image; expected "
                                 f"{Path(orphans[0]).name.replace('_label', '_image')} beside it"
                                 + (f" ({len(orphans) - 1} more such label maps)" if len(orphans) > 1 else "") + ".")
    if skipped:
        notes.append(f"{len(skipped)} MM-WHS ct_test image(s) without a label map were left out "
                     f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}).")
    if not cases:
        raise _no_cases("mmwhs", root)
    _unique_case_ids(cases, "mmwhs")
    return Dataset("mmwhs", root, _sorted(cases), notes=notes)


def asoca_remap(table) -> Dict[int, int]:
    """ASOCA's artery value (1) -> the coronary table's value: {} when the table holds 1, else
    {1: v} for a single-label table with value v (a table with several labels is an error)."""
    values = list(table.values)
    if ASOCA_ARTERY_VALUE in values:
        return {}
    if len(values) != 1:
        raise DatasetLayoutError(f"asoca layout: ASOCA annotations are binary (1 = coronary artery) but the task's "
                                 f"table '{table.name}' has {len(values)} labels {values}; use --task coronary.")
    return {ASOCA_ARTERY_VALUE: values[0]}


def read_asoca(root: PathLike) -> Dataset:
    from gvsl.io import is_image_file
    root = _check_root(root)
    files = _walk_files(root)
    ctca_dirs = sorted({p.parent for p in files if p.parent.name == "CTCA"})
    cases, notes = [], []
    for ann in sorted({p.parent for p in files if p.parent.name == "Annotations"}):
        if not (ann.parent / "CTCA").is_dir():
            raise DatasetLayoutError(f"asoca layout: {ann} has no CTCA folder beside it; expected "
                                     f"{ann.parent / 'CTCA'} with the images of these annotations.")
    for ctca in ctca_dirs:
        ann = ctca.parent / "Annotations"
        images = sorted(p for p in ctca.iterdir() if p.is_file() and is_image_file(p))
        if not images:
            continue
        if not ann.is_dir():  # e.g. ASOCA's test set, released without annotations
            notes.append(f"{len(images)} ASOCA image(s) in {ctca} have no Annotations folder beside it and were "
                         "left out (unlabelled, e.g. the challenge's test set).")
            continue
        labels = {p.name: p for p in ann.iterdir() if p.is_file() and is_image_file(p)}
        for img in images:
            if img.name not in labels:
                raise DatasetLayoutError(f"asoca layout: {img} has no annotation; expected {ann / img.name}.")
            cases.append((_stem(img), img, labels.pop(img.name)))
        if labels:
            extra = sorted(labels)[0]
            raise DatasetLayoutError(f"asoca layout: annotation {ann / extra} has no image; expected {ctca / extra}.")
    if not cases:
        raise _no_cases("asoca", root)
    _unique_case_ids(cases, "asoca")
    return Dataset("asoca", root, _sorted(cases), notes=notes)


def read_candi(root: PathLike) -> Dataset:
    root = _check_root(root)
    files = _walk_files(root)
    cases, seg_of = [], {}
    for p in files:
        m = _CANDI_LABEL.match(p.name)
        if m:
            seg_of[(p.parent, m.group("id"))] = p
    for p in files:
        m = _CANDI_IMAGE.match(p.name)
        if not m:
            continue
        key = (p.parent, m.group("id"))
        if key not in seg_of:
            raise DatasetLayoutError(f"candi layout: {p} has no segmentation; expected "
                                     f"{p.parent / (m.group('id') + '_seg' + m.group('ext'))} beside it.")
        cases.append((m.group("id"), p, seg_of.pop(key)))
    if seg_of:
        (folder, sid), seg = sorted(seg_of.items())[0]
        raise DatasetLayoutError(f"candi layout: segmentation {seg} has no image; expected "
                                 f"{folder / (sid + '_procimg.nii.gz')} beside it.")
    if not cases:
        raise _no_cases("candi", root)
    _unique_case_ids(cases, "candi")
    groups = sorted({c[1].parent.parent.name for c in cases})
    notes = ["CANDI segmentations carry more FreeSurfer labels than the task's table: label values outside it "
             "were mapped to background (the candi layout reads labels with --ignore-unknown-labels)."]
    unknown_groups = [g for g in groups if g not in CANDI_GROUPS]
    if unknown_groups:
        notes.append(f"CANDI group folder(s) {unknown_groups} are not among {list(CANDI_GROUPS)}; their cases are used.")
    return Dataset("candi", root, _sorted(cases), ignore_unknown=True, notes=notes)


def _stem(path: Path) -> str:
    from gvsl.io import image_stem
    return image_stem(path)


def read_plain(root: PathLike) -> Dataset:
    from gvsl.io import is_image_file
    root = _check_root(root)
    img_dir, lab_dir = root / "images", root / "labels"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DatasetLayoutError(f"plain layout: {d} is not a folder; expected {EXPECTED['plain']}.")
    images = {_stem(p): p for p in sorted(img_dir.iterdir()) if p.is_file() and is_image_file(p)}
    labels = {_stem(p): p for p in sorted(lab_dir.iterdir()) if p.is_file() and is_image_file(p)}
    for name, img in images.items():
        if name not in labels:
            raise DatasetLayoutError(f"plain layout: image {img} has no label map; expected "
                                     f"{lab_dir / img.name} (pairs are matched by file name).")
    for name, lab in labels.items():
        if name not in images:
            raise DatasetLayoutError(f"plain layout: label map {lab} has no image; expected {img_dir / lab.name}.")
    if not images:
        raise _no_cases("plain", root)
    return Dataset("plain", root, _sorted([(n, images[n], labels[n]) for n in images]))


READERS: Dict[str, Callable[[PathLike], Dataset]] = {
    "mmwhs": read_mmwhs, "asoca": read_asoca, "candi": read_candi, "plain": read_plain}


# ---------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------
def detect_layouts(root: PathLike) -> List[str]:
    """The layouts whose image files are present under ``root`` (file names only)."""
    root = _check_root(root)
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return ["plain"]
    found = []
    files = _walk_files(root)
    names = [p.name for p in files]
    if any(_MMWHS_IMAGE.match(n) or _MMWHS_LABEL.match(n) for n in names):
        found.append("mmwhs")
    if any(p.parent.name in ("CTCA", "Annotations") for p in files):
        found.append("asoca")
    if any(_CANDI_IMAGE.match(n) for n in names):
        found.append("candi")
    return found


def read_dataset(root: PathLike, layout: str = "auto", task: Optional[str] = None,
                 ignore_unknown: bool = False) -> Dataset:
    """Read ``root`` in ``layout`` (``auto``: detected; module docstring). ``task``: the task's
    name or table (for ASOCA's remap); ``ignore_unknown``: the user's --ignore-unknown-labels."""
    if layout not in ("auto",) + LAYOUTS:
        raise DatasetLayoutError(f"--layout must be auto, {', '.join(LAYOUTS)} (got {layout!r}).")
    root = _check_root(root)
    if layout == "auto":
        found = detect_layouts(root)
        if not found:
            listing = "; ".join(f"{EXPECTED[k]}" for k in LAYOUTS)
            raise DatasetLayoutError(f"--data {root} matches none of the known layouts. Expected one of: {listing}. "
                                     "Arrange the files like one of them (or pass --layout).")
        if len(found) > 1:
            raise DatasetLayoutError(f"--data {root} holds files of several layouts ({', '.join(found)}); "
                                     "pass --layout to choose one.")
        layout = found[0]
    dataset = READERS[layout](root)
    if layout == "asoca" and task is not None:
        from gvsl.segdata import resolve_table
        dataset.remap = asoca_remap(resolve_table(task))
        if dataset.remap:
            dataset.notes.append(f"ASOCA artery value 1 was remapped to {dataset.remap[1]} (the task table's value).")
    dataset.ignore_unknown = dataset.ignore_unknown or bool(ignore_unknown)
    return dataset


# ---------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------
def parse_split(text: str) -> Tuple[int, int, Optional[int]]:
    """``"15/5/rest"`` -> (15, 5, None); ``"2/1/1"`` -> (2, 1, 1). Train >= 1, val >= 0, test >= 1."""
    parts = str(text).strip().split("/")
    if len(parts) != 3:
        raise SplitError(f"--split must be TRAIN/VAL/TEST, e.g. 15/5/rest or 2/1/1 (got {text!r}).")
    try:
        numbers = [None if (p.strip().lower() == "rest" and i == 2) else int(p) for i, p in enumerate(parts)]
    except ValueError:
        raise SplitError(f"--split must be three whole numbers TRAIN/VAL/TEST (the last may be 'rest'), "
                            f"e.g. 15/5/rest (got {text!r}).") from None
    train, val, test = numbers
    if train < 1 or val < 0 or (test is not None and test < 1):
        raise SplitError(f"--split {text}: needs at least 1 training and 1 test case (validation may be 0).")
    return train, val, test


def _suggest_split(n: int) -> str:
    if n < 2:
        return "at least 2 cases are needed (1 train, 1 test)"
    train = max(1, (3 * n) // 5)
    val = 1 if n - train >= 2 else 0
    return f"e.g. --split {train}/{val}/rest"


def make_splits(cases: Sequence[Tuple[str, Path, Path]], rule: str, seed: int = 0) -> dict:
    """Seeded split of ``cases`` (sorted (id, image, label)) by ``rule`` -> a dict with
    ``train``/``val``/``test``/``unused`` lists of {id, image, label} (each sorted by id), the
    rule, the seed and the counts. Too few cases: an error with the counts and a --split hint."""
    train_n, val_n, test_n = parse_split(rule)
    n = len(cases)
    need = train_n + val_n + (test_n if test_n is not None else 1)
    if n < need:
        what = f"{train_n} train + {val_n} val + {'at least 1' if test_n is None else test_n} test"
        raise SplitError(f"the split {rule} needs {need} cases ({what}) but --data holds {n}; "
                            f"pass --split TRAIN/VAL/TEST for this data ({_suggest_split(n)}).")
    ordered = sorted(cases, key=lambda c: natural_key(c[0]))
    order = np.random.default_rng(int(seed)).permutation(n)
    shuffled = [ordered[i] for i in order]
    bounds = [train_n, train_n + val_n, train_n + val_n + (test_n if test_n is not None else n - train_n - val_n)]
    parts = {"train": shuffled[:bounds[0]], "val": shuffled[bounds[0]:bounds[1]],
             "test": shuffled[bounds[1]:bounds[2]], "unused": shuffled[bounds[2]:]}

    def entries(group):
        return [{"id": cid, "image": str(img), "label": str(lab)}
                for cid, img, lab in sorted(group, key=lambda c: natural_key(c[0]))]
    return {"rule": rule, "seed": int(seed), "n_cases": n,
            "counts": {k: len(v) for k, v in parts.items()},
            "shuffle": "numpy.random.default_rng(seed).permutation over the cases sorted by id",
            **{k: entries(v) for k, v in parts.items()}}
