"""Fine-tune from (volume node, segmentation node) pairs (MRML, no Qt).

:func:`export_pairs` writes each pair as ``images/<i>.nrrd`` + ``labels/<i>.nrrd`` (NRRD keeps the geometry in double precision; NIfTI rounds it to float32) (the
segments exported onto the volume's grid with the task's source values, matched by segment
name; label map volume nodes are taken as they are). The pairs are exported into
``<output_dir>-inputs/`` beside the output folder (kept): a resumed run names the same files, as ``--resume`` requires. :func:`finetune_from_nodes` then runs
:func:`gvsl.segtrain.finetune` in this process (console API, blocking) and returns the summary
with ``model_path`` (the best checkpoint). :func:`start_finetune` runs ``gvsl finetune`` as a
background child process through the shared job runner (:mod:`gvsl_slicer.jobs`) for the panel:
progress records, Cancel, a live loss/Dice chart. Nodes are never modified.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import gvsl_mrml

from GVSLSegmentationLib.logic import SegmentationInputError, segmentation_label_values


def _labels_of(label_node, volume_node, table):
    if label_node is None:
        raise SegmentationInputError(f"volume '{volume_node.GetName()}' has no segmentation paired with it.")
    if label_node.IsA("vtkMRMLSegmentationNode"):
        values = segmentation_label_values(label_node, table)
        image, _ = gvsl_mrml.segmentation_to_sitk_labels(label_node, volume_node, segment_values=values,
                                                         visible_only=False)
        return image
    image, _ = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(label_node, volume_node)
    return image


def export_pairs(pairs: Sequence[Tuple[object, object]], folder, task) -> Tuple[List[str], List[str]]:
    """Write (volume, segmentation-or-labelmap) node pairs as NIfTI files -> (images, labels) paths."""
    from gvsl.io import write_image_atomic
    from gvsl.segdata import resolve_table
    table = resolve_table(task)
    if not pairs:
        raise SegmentationInputError("add at least one (volume, segmentation) pair to fine-tune on.")
    folder = Path(folder)
    images, labels = [], []
    for i, (volume_node, label_node) in enumerate(pairs):
        if volume_node is None:
            raise SegmentationInputError(f"pair {i + 1} has no volume.")
        image = gvsl_mrml.volume_node_to_sitk(volume_node, apply_parent_transform=False, what=f"volume of pair {i + 1}")
        lab = _labels_of(label_node, volume_node, table)
        images.append(str(write_image_atomic(image, folder / "images" / f"case{i:03d}.nrrd")))
        labels.append(str(write_image_atomic(lab, folder / "labels" / f"case{i:03d}.nrrd")))
    return images, labels


def inputs_folder(output_dir) -> Path:
    """Where the node pairs are exported: ``<output_dir>-inputs`` beside the output folder (never
    inside it: ``--out`` may not hold the run's own inputs), the same for every run into
    ``output_dir``, so a resumed run names the same files."""
    output_dir = Path(output_dir).expanduser().absolute()
    return output_dir.parent / f"{output_dir.name}-inputs"


def finetune_from_nodes(pairs, task, output_dir, *, validation_pairs=None, pretrained: Optional[str] = None,
                        callback: Optional[Callable[[dict], None]] = None, cancel=None, **options) -> dict:
    """Fine-tune on node pairs in this process; ``options`` are :class:`gvsl.segtrain.FinetuneConfig`
    fields (mode, steps, crop, batch_size, lr, device, model_channels, ...). Returns the trainer's
    summary plus ``model_path`` (seg_best.pt when validation ran, else seg_final.pt/seg_last.pt)."""
    from gvsl.segtrain import finetune
    output_dir = Path(output_dir)
    images, labels = export_pairs(pairs, inputs_folder(output_dir) / "train", task)
    val = export_pairs(validation_pairs, inputs_folder(output_dir) / "val", task) if validation_pairs else (None, None)
    options.setdefault("progress", "none")
    summary = finetune(task=task, images=images, labels=labels, val_images=val[0], val_labels=val[1],
                       out=str(output_dir), pretrained=pretrained, callback=callback, cancel=cancel, **options)
    summary["model_path"] = model_path_of(summary)
    return summary


def model_path_of(summary: dict) -> str:
    """The checkpoint to segment with after a run: the best validation one if any, else the last written."""
    best = (summary.get("best") or {}).get("checkpoint")
    if best and os.path.isfile(best):
        return best
    return summary.get("checkpoint", "")


class FinetuneRun:
    """A background ``gvsl finetune`` (see the module docstring). ``poll()`` never blocks; after the
    end: ``state``, ``error``, ``summary``, ``model_path``. ``history``: step records for the chart."""

    def __init__(self, pairs, task, output_dir, *, pretrained=None, validation_pairs=None,
                 on_event: Optional[Callable[[dict], None]] = None, resume: bool = False, scene=None, **options):
        from gvsl_slicer.jobs import Job
        self.inputs_dir = inputs_folder(output_dir)
        images, labels = export_pairs(pairs, self.inputs_dir / "train", task)
        args = ["finetune", "--task", str(task), "--images", *images, "--labels", *labels, "--out", str(output_dir)]
        if validation_pairs:
            vi, vl = export_pairs(validation_pairs, self.inputs_dir / "val", task)
            args += ["--val-images", *vi, "--val-labels", *vl]
        if pretrained:
            args += ["--pretrained", str(pretrained)]
        for key, value in options.items():
            if value is None or value is False:
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif isinstance(value, (list, tuple)):
                args += [flag, *[str(v) for v in value]]
            else:
                args += [flag, str(value)]
        if resume:
            args.append("--resume")
        self.on_event = on_event
        self.chart = None
        if scene is not None:
            from GVSLSegmentationLib.background import TermsChart
            self.chart = TermsChart(scene, f"GVSL fine-tuning ({Path(output_dir).name})")
        self.steps: List[dict] = []
        self.validations: List[dict] = []
        self.summary: Optional[dict] = None
        self.job = Job(args, on_event=self._event, grace_s=120.0)

    def _event(self, record: dict) -> None:
        if self.chart is not None:
            self.chart.append(record)
        if record.get("event") == "step":
            self.steps.append(record)
        elif record.get("event") == "validation":
            self.validations.append(record)
        elif record.get("event") in ("done", "cancelled"):
            self.summary = record
        if self.on_event is not None:
            self.on_event(record)

    def start(self) -> "FinetuneRun":
        self.job.start()
        return self

    def poll(self) -> str:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()

    def wait(self, timeout: Optional[float] = None) -> str:
        return self.job.wait(timeout) if timeout is not None else self.job.wait()

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def error(self) -> str:
        return getattr(self.job, "error", "") or ""

    @property
    def model_path(self) -> str:
        return model_path_of(self.summary or {})


def start_finetune(pairs, task, output_dir, **kwargs) -> FinetuneRun:
    """Export the pairs and start ``gvsl finetune`` in the background -> :class:`FinetuneRun`."""
    return FinetuneRun(pairs, task, output_dir, **kwargs).start()
