"""Segmentation data: image + label pairs, label values -> classes, foreground-biased patches.

* :func:`resolve_table`: ``heart`` | ``coronary`` | ``brain`` | a ``.tsv`` file -> the task's
  :class:`gvsl.labels.LabelTable`. Class 0 is the background; class ``i`` (1-based) is the
  table's i-th label in increasing source value (e.g. heart: 205 -> 1, ..., 850 -> 7).
* :class:`LabelEncoder`: source label values -> class indices. Values outside the table are an
  error listing them, unless ``ignore_unknown`` (they become background; the count of voxels is
  reported) or a remapping ``{source: target}`` (target a table value, or 0) is given first
  (:func:`load_remap` reads it from a two-column TSV ``source<TAB>target``).
* :func:`find_pairs`: images and labels from two folders (matched by file name) or two lists.
* :func:`load_case`: read, check (3D, same size and geometry, integer, not empty) and put both on
  the image's preprocessing grid (image: ``preprocess``; labels: ``preprocess_labels``, nearest
  neighbour) -> :class:`Case` with (z, y, x) arrays.
* :func:`sample_patch`: a ``crop``^3 patch whose centre is, with probability ``pos_fraction``, a
  voxel of a randomly chosen present class (MONAI ``RandCropByLabelClassesd``-style balancing, so
  thin rare structures such as coronary arteries are seen), else any voxel. All randomness comes
  from the caller's ``torch.Generator`` so a resumed run draws the same patches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from gvsl.errors import GVSLError
from gvsl.labels import TASKS, LabelError, LabelTable, load_task_table

ImageLike = Union[str, Path, sitk.Image]
GEOMETRY_TOL_MM = 1e-3


class SegmentationDataError(GVSLError, ValueError):
    """A problem with segmentation images/labels, naming the file and the fix."""


def resolve_table(task: Union[str, Path, LabelTable]) -> LabelTable:
    """A task name (heart, coronary, brain), a TSV label table path, or a table -> LabelTable."""
    if isinstance(task, LabelTable):
        return task
    try:
        if str(task) in TASKS:
            return load_task_table(str(task))
        return LabelTable.load(Path(task))
    except LabelError as exc:
        raise SegmentationDataError(f"--task {task}: {exc}") from None


def load_remap(path: Union[str, Path]) -> Dict[int, int]:
    """A remapping table: lines ``source<TAB>target`` (``#`` comments and a non-numeric header
    allowed); target 0 = background. -> {source: target}."""
    path = Path(path)
    if not path.is_file():
        raise SegmentationDataError(f"remapping table {path} not found (a TSV of 'source<TAB>target' lines).")
    out: Dict[int, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        try:
            out[int(parts[0])] = int(parts[1])
        except (ValueError, IndexError):
            if not out and i <= 2:  # a header row
                continue
            raise SegmentationDataError(f"{path} line {i}: expected two integers 'source<TAB>target', got {line!r}")
    if not out:
        raise SegmentationDataError(f"remapping table {path} has no 'source<TAB>target' rows.")
    return out


@dataclass
class LabelEncoder:
    """Source label values -> class indices (0 background, i = i-th table label)."""

    table: LabelTable
    remap: Dict[int, int] = field(default_factory=dict)
    ignore_unknown: bool = False

    def __post_init__(self):
        bad = sorted(t for t in self.remap.values() if t != 0 and t not in self.table.values)
        if bad:
            raise SegmentationDataError(f"remapping targets {bad} are not values of label table "
                                        f"'{self.table.name}' ({self.table.values}) nor 0 (background).")

    @property
    def n_classes(self) -> int:
        return len(self.table) + 1

    def class_values(self) -> np.ndarray:
        """(n_classes,) int64: class index -> source label value (0 for the background)."""
        return np.array([0] + list(self.table.values), dtype=np.int64)

    def encode(self, labels_zyx: np.ndarray, name: str = "label map") -> Tuple[np.ndarray, int]:
        """Label values (any integer array) -> (classes uint8 of the same shape, number of voxels
        that had unknown values and became background)."""
        arr = np.asarray(labels_zyx)
        values, inverse = np.unique(arr, return_inverse=True)
        index = {v: i + 1 for i, v in enumerate(self.table.values)}
        lut = np.zeros(len(values), dtype=np.uint8)
        unknown = []
        for k, v in enumerate(values.tolist()):
            v = int(v)
            target = self.remap.get(v, v)
            if target == 0:
                continue
            if target in index:
                lut[k] = index[target]
            else:
                unknown.append(v)
        n_unknown = int(np.isin(arr, unknown).sum()) if unknown else 0
        if unknown and not self.ignore_unknown:
            shown = unknown[:20] + (["..."] if len(unknown) > 20 else [])
            raise SegmentationDataError(
                f"{name} has label value(s) {shown} ({n_unknown} voxels) that are not in the "
                f"'{self.table.name}' table ({self.table.values}). Pass --ignore-unknown-labels to "
                "treat them as background, or a remapping table (--remap TSV of 'source<TAB>target').")
        return lut[inverse.reshape(arr.shape)], n_unknown


# ----------------------------------------------------------------------------------------
# pairs, checks, cases
# ----------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    from gvsl.io import image_stem
    return image_stem(path)


def _files(folder: Path) -> List[Path]:
    from gvsl.io import is_image_file
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def find_pairs(images: Union[ImageLike, Sequence[ImageLike]],
               labels: Union[ImageLike, Sequence[ImageLike]]) -> List[Tuple[ImageLike, ImageLike]]:
    """Two folders (pairs matched by file name without extension) or two equally long lists."""
    def as_list(x):
        return list(x) if isinstance(x, (list, tuple)) else [x]
    imgs, labs = as_list(images), as_list(labels)
    if len(imgs) == 1 and len(labs) == 1 and isinstance(imgs[0], (str, Path)) and Path(imgs[0]).is_dir():
        img_dir, lab_dir = Path(imgs[0]), Path(labs[0])
        if not lab_dir.is_dir():
            raise SegmentationDataError(f"labels folder {lab_dir} not found (images are the folder {img_dir}).")
        by_name = {_stem(p): p for p in _files(lab_dir)}
        img_files = _files(img_dir)
        if not img_files:
            raise SegmentationDataError(f"no image files (.nii.gz, .nrrd, .mha, ...) in {img_dir}.")
        missing = [p.name for p in img_files if _stem(p) not in by_name]
        if missing:
            raise SegmentationDataError(
                f"no label map in {lab_dir} with the same name as image(s) {missing[:10]}; pairs are "
                "matched by file name (images/case1.nii.gz <-> labels/case1.nii.gz).")
        return [(p, by_name[_stem(p)]) for p in img_files]
    if len(imgs) != len(labs):
        raise SegmentationDataError(f"{len(imgs)} image(s) but {len(labs)} label map(s); give one label map per image.")
    if not imgs:
        raise SegmentationDataError("no training images given.")
    return list(zip(imgs, labs))


def _read(x: ImageLike, what: str) -> Tuple[sitk.Image, str]:
    from gvsl.io import VolumeError, read_volume, validate_volume
    try:
        if isinstance(x, sitk.Image):
            return validate_volume(x, what), what
        return read_volume(x), Path(x).name
    except VolumeError as exc:
        raise SegmentationDataError(f"{what}: {exc}") from None


def check_label_image(labels: sitk.Image, image: sitk.Image, label_name: str, image_name: str) -> None:
    """Raise unless ``labels`` is an integer map on exactly ``image``'s voxel grid."""
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.mod(arr, 1) == 0):
            raise SegmentationDataError(f"{label_name} has non-integer values: it looks like an image, not "
                                        "a label map (pass the label map as --labels).")
    if tuple(labels.GetSize()) != tuple(image.GetSize()):
        raise SegmentationDataError(
            f"{label_name} has size {labels.GetSize()} but its image {image_name} has size {image.GetSize()}; "
            "a label map must be on its image's voxel grid (resample it onto the image first).")
    for what, a, b in (("origin", labels.GetOrigin(), image.GetOrigin()),
                       ("spacing", labels.GetSpacing(), image.GetSpacing()),
                       ("direction", labels.GetDirection(), image.GetDirection())):
        if not np.allclose(a, b, atol=GEOMETRY_TOL_MM):
            raise SegmentationDataError(
                f"{label_name} and {image_name} have different {what} ({tuple(round(v, 4) for v in a)} vs "
                f"{tuple(round(v, 4) for v in b)}); the label map must share its image's geometry.")


@dataclass
class Case:
    """One training/validation case on its preprocessing grid (arrays (z, y, x))."""
    name: str
    image_zyx: np.ndarray      # float32 in [0, 1]
    classes_zyx: np.ndarray    # uint8 class indices
    unknown_voxels: int = 0
    warnings: List[str] = field(default_factory=list)
    class_voxels: List[np.ndarray] = field(default_factory=list, repr=False)  # flat indices per class

    def __post_init__(self):
        if not self.class_voxels:  # foreground voxels only (int64 flat indices), grouped by class
            flat = self.classes_zyx.ravel()
            fg = np.flatnonzero(flat)
            fg = fg[np.argsort(flat[fg], kind="stable")]
            counts = np.bincount(flat[fg], minlength=int(flat.max()) + 1)
            self.class_voxels = [np.empty(0, np.int64)] + list(np.split(fg, np.cumsum(counts[1:])[:-1]))


def load_case(image: ImageLike, labels: ImageLike, spec, encoder: LabelEncoder) -> Case:
    """Read + check one pair, preprocess the image, encode and resample the labels (nearest)."""
    from gvsl.io import VolumeError
    from gvsl.preprocessing import preprocess, preprocess_labels
    img, img_name = _read(image, "image")
    lab, lab_name = _read(labels, f"label map of {img_name}")
    check_label_image(lab, img, lab_name, img_name)
    classes, n_unknown = encoder.encode(sitk.GetArrayViewFromImage(lab), lab_name)
    if not classes.any():
        raise SegmentationDataError(
            f"{lab_name} has no voxel of any '{encoder.table.name}' structure (values present: "
            f"{np.unique(sitk.GetArrayViewFromImage(lab)).tolist()[:20]}); an empty label map cannot teach "
            "the network. Remove the pair or fix its labels.")
    try:
        prepared = preprocess(img, spec, name=img_name)
    except VolumeError as exc:
        raise SegmentationDataError(str(exc)) from None
    cls_img = sitk.GetImageFromArray(classes)
    cls_img.CopyInformation(lab)
    on_grid = preprocess_labels(cls_img, prepared.grid, spec.orientation).astype(np.uint8)
    return Case(img_name, prepared.array_zyx, on_grid, n_unknown, warnings=list(prepared.warnings))


# ----------------------------------------------------------------------------------------
# patches
# ----------------------------------------------------------------------------------------
def _window(size: int, crop: int, centre: int) -> Tuple[slice, slice]:
    """Source and destination slices of a ``crop`` window centred at ``centre`` on an axis of
    ``size`` voxels: shifted to stay inside when size >= crop, else the whole axis centred."""
    if size >= crop:
        start = min(max(centre - crop // 2, 0), size - crop)
        return slice(start, start + crop), slice(0, crop)
    before = (crop - size) // 2
    return slice(0, size), slice(before, before + size)


def sample_patch(case: Case, crop: int, generator: torch.Generator, pos_fraction: float = 2 / 3,
                 pad_value: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """A (crop, crop, crop) image patch (float32) and its class patch (int64); see the module
    docstring for the centre choice (balanced over the foreground classes present)."""
    shape = case.classes_zyx.shape
    present = [c for c in range(1, len(case.class_voxels)) if len(case.class_voxels[c])]
    if present and float(torch.rand(1, generator=generator)) < pos_fraction:
        cls = present[int(torch.randint(len(present), (1,), generator=generator))]
        voxels = case.class_voxels[cls]
        flat = int(voxels[int(torch.randint(len(voxels), (1,), generator=generator))])
        centre = np.unravel_index(flat, shape)
    else:
        centre = [int(torch.randint(s, (1,), generator=generator)) for s in shape]
    img = np.full((crop,) * 3, pad_value, dtype=np.float32)
    lab = np.zeros((crop,) * 3, dtype=np.int64)
    src, dst = zip(*[_window(s, crop, int(c)) for s, c in zip(shape, centre)])
    img[dst] = case.image_zyx[src]
    lab[dst] = case.classes_zyx[src]
    return img, lab


def sample_batch(cases: List[Case], batch: int, crop: int, generator: torch.Generator,
                 pos_fraction: float = 2 / 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 1, c, c, c) float32, classes (B, 1, c, c, c) int64) from random cases."""
    imgs, labs = [], []
    for _ in range(batch):
        case = cases[int(torch.randint(len(cases), (1,), generator=generator))]
        i, lab = sample_patch(case, crop, generator, pos_fraction)
        imgs.append(i)
        labs.append(lab)
    return torch.from_numpy(np.stack(imgs)[:, None]), torch.from_numpy(np.stack(labs)[:, None])


def voxel_count_summary(cases: List[Case], n_classes: int) -> List[int]:
    """Voxels per class over all cases (on the preprocessing grids)."""
    totals = np.zeros(n_classes, dtype=np.int64)
    for c in cases:
        totals += np.bincount(c.classes_zyx.ravel(), minlength=n_classes)[:n_classes]
    return [int(v) for v in totals]

