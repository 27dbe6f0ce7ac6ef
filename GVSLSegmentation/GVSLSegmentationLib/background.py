"""The panel's long jobs as child processes (shared job runner :mod:`gvsl_slicer.jobs`), no Qt.

* :class:`SegmentationRun`: exports the input volume, runs ``gvsl segment`` in the background,
  and at the end (``poll()`` -> "done") reads the label map and fills the segmentation node with
  :func:`GVSLSegmentationLib.logic.labels_to_segmentation`, exactly as :func:`segment_volume` does
  in-process. The GUI never waits on the network; Cancel stops between stages.
* :class:`TermsChart`: a live chart of a job's step records (table node + one plot series per
  term + a chart node): fine-tuning shows loss, Dice loss, cross-entropy and the validation Dice.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import gvsl_mrml
import slicer
import vtk

from GVSLSegmentationLib.logic import ATTRIBUTE_MODEL, labels_to_segmentation, load_segmentation_model


class SegmentationRun:
    """Background ``gvsl segment`` of ``volume_node``; after "done", ``segmentation_node`` is filled."""

    def __init__(self, volume_node, model_path: str, device: str = "auto", segmentation_node=None,
                 show_3d_surfaces: bool = False, on_event: Optional[Callable[[dict], None]] = None):
        from gvsl.io import write_image_atomic
        from gvsl_slicer.jobs import Job
        self.volume_node = volume_node
        self.model_path = str(model_path)
        self.table = None
        from gvsl.segmodel import label_table_of
        self.table = label_table_of(load_segmentation_model(self.model_path))  # refuses other kinds now
        self.segmentation_node = segmentation_node
        self.show_3d_surfaces = show_3d_surfaces
        self.temp_dir = tempfile.mkdtemp(prefix="gvsl-segment-")
        image = gvsl_mrml.volume_node_to_sitk(volume_node, apply_parent_transform=False, what="input volume")
        self.image_path = str(write_image_atomic(image, Path(self.temp_dir) / "input.nrrd"))
        self.labels_path = str(Path(self.temp_dir) / "labels.nrrd")
        self._on_event = on_event
        self.job = Job(["segment", "--model", self.model_path, "--image", self.image_path, "--out", self.labels_path,
                        "--device", device], on_event=self._event, grace_s=10.0)
        self._finished = False

    def _event(self, record: dict) -> None:
        if self._on_event is not None:
            self._on_event(record)

    def start(self) -> "SegmentationRun":
        self.job.start()
        return self

    def cancel(self) -> None:
        self.job.cancel()

    def poll(self) -> str:
        state = self.job.poll()
        if state in ("done", "cancelled", "failed") and not self._finished:
            self._finished = True
            try:
                if state == "done":
                    self._load()
            finally:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        return state

    def wait(self, timeout: Optional[float] = None) -> str:
        self.job.wait(timeout)
        return self.poll()

    def _load(self) -> None:
        from gvsl.io import read_volume
        labels = read_volume(self.labels_path)
        scene = self.volume_node.GetScene()
        name = self.segmentation_node.GetName() if self.segmentation_node is not None else \
            f"{self.volume_node.GetName()} segmentation (GVSL)"
        node = labels_to_segmentation(labels, self.table, scene, name, self.volume_node, node=self.segmentation_node)
        node.SetAttribute(ATTRIBUTE_MODEL, self.model_path)
        node.SetAttribute("GVSL.result", json.dumps(self.job.result or {}, default=str))
        if self.show_3d_surfaces:
            node.CreateClosedSurfaceRepresentation()
        self.segmentation_node = node


class TermsChart:
    """Rows of ``terms`` appended from step (and validation) records of a job."""

    COLORS = ((0.1, 0.1, 0.1), (0.85, 0.33, 0.1), (0.0, 0.45, 0.74), (0.47, 0.67, 0.19), (0.49, 0.18, 0.56))

    def __init__(self, scene, name: str, terms: Sequence[str] = ("loss", "dice", "ce", "val_dice_mean")):
        self.scene, self.terms = scene, tuple(terms)
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in ("step",) + self.terms:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss / Dice")
        self.series: Dict[str, object] = {}
        for term, color in zip(self.terms, self.COLORS):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {term}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(term)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if not term.startswith("val_")
                                  else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*color)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series[term] = series

    def alive(self) -> bool:
        return self.table.GetScene() is self.scene and self.scene.IsNodePresent(self.table) != 0

    def append(self, record: dict) -> Optional[int]:
        """A step record fills the loss columns; a validation record the ``val_*`` ones (NaN elsewhere)."""
        event = record.get("event")
        if event not in ("step", "validation") or not self.alive():
            return None
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for col, key in enumerate(("step",) + self.terms):
            if key == "step":
                value = record.get("step")
            elif key.startswith("val_"):
                value = record.get(key[4:]) if event == "validation" else None
            else:
                value = record.get(key) if event == "step" else None
            table.SetValue(row, col, vtk.vtkVariant(float("nan") if value is None else float(value)))
        table.Modified()
        self.table.Modified()
        return row

    def values(self, term: str) -> list:
        table = self.table.GetTable()
        col = (("step",) + self.terms).index(term)
        return [table.GetValue(r, col).ToDouble() for r in range(table.GetNumberOfRows())]
