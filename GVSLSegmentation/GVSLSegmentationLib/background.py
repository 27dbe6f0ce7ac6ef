"""The panel's long jobs as child processes (shared job runner :mod:`gvsl_slicer.jobs`), no Qt.

* :class:`SegmentationRun`: exports the input volume, runs ``gvsl segment`` in the background,
  and at the end (``poll()`` -> "done") reads the label map and fills the segmentation node with
  :func:`GVSLSegmentationLib.logic.labels_to_segmentation`, exactly as :func:`segment_volume` does
  in-process. The GUI never waits on the network; Cancel stops between stages.
* :class:`TermsChart` (the shared :mod:`gvsl_slicer.chart`, re-exported): fine-tuning's live
  chart of loss, Dice loss, cross-entropy and the validation Dice.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import gvsl_mrml

from gvsl_slicer.chart import TermsChart  # noqa: F401 - the shared chart, re-exported for the panel
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
