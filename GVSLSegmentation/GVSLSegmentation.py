"""GVSL Segmentation: segment heart, coronary arteries or brain with a fine-tuned GVSL model, and
fine-tune the pre-trained backbone on your own labelled volumes, in the background.

Thin Slicer module: the panel wires widgets to GVSLSegmentationLib (MRML logic, no Qt), which runs
``gvsl segment`` / ``gvsl finetune`` as child processes through gvsl_slicer.jobs (progress, Cancel,
live loss/Dice chart). Dependencies (PyTorch, MONAI) are checked on first use, never at import.
"""
import logging
import os

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

MODEL_SETTING = "GVSL/SegmentationModelPath"
OUTPUT_SETTING = "GVSL/FinetuneOutputFolder"
TASKS = ("heart", "coronary", "brain")


class GVSLSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GVSL Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for Slicer developers"]
        self.parent.helpText = (
            "Segment a volume with a GVSL model fine-tuned for the heart (7 MM-WHS structures), the coronary "
            "arteries or the brain (28 FreeSurfer structures): segments get the structures' names, colours and "
            "terminology. The Fine-tune section trains such a model on pairs of volumes and segmentations "
            "already in the scene, starting from a GVSL pre-trained backbone, in the background (progress, "
            "live loss and Dice chart, Cancel keeps the checkpoint).")
        self.parent.acknowledgementText = (
            "GVSL: Geometric Visual Similarity Learning in 3D Medical Image Self-supervised Pre-training, "
            "Y. He et al., CVPR 2023.")


class GVSLSegmentationWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.segmentRun = None
        self.finetuneRun = None
        self.pollers = []
        self.pairs = []  # [(volume node ID, segmentation node ID)]

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GVSLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLSegmentationLogic()
        self.ui.taskComboBox.addItems(list(TASKS))
        self.ui.modeComboBox.addItems(["finetune", "linear"])
        self.ui.deviceComboBox.addItem("auto", "auto")
        self.ui.deviceComboBox.addItem("cpu", "cpu")
        self.ui.outputFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.modelPathLineEdit.currentPath = qt.QSettings().value(MODEL_SETTING, "") or self.logic.currentModelPath()
        self.ui.outputFolderPathLineEdit.currentPath = qt.QSettings().value(OUTPUT_SETTING, "") or ""
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.outputFolderPathLineEdit.connect("currentPathChanged(QString)", self.onOutputChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelSegment)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.startFinetuneButton.connect("clicked(bool)", self.onStartFinetune)
        self.ui.cancelFinetuneButton.connect("clicked(bool)", self.onCancelFinetune)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.onModelChanged(self.ui.modelPathLineEdit.currentPath)

    def enter(self):
        try:
            from gvsl_slicer.devices import list_devices
            self.ui.deviceComboBox.clear()
            for value, label in list_devices():
                self.ui.deviceComboBox.addItem(label, value)
        except Exception as exc:  # a broken torch must not break the panel  # noqa: BLE001
            logging.warning(f"GVSL: could not list devices: {exc}")
        self.updateButtons()

    def cleanup(self):
        for run in (self.segmentRun, self.finetuneRun):
            if run is not None and run.job.running:
                run.job.kill()

    # -- state -------------------------------------------------------------------------------
    def onModelChanged(self, path):
        qt.QSettings().setValue(MODEL_SETTING, path)
        self.ui.modelInfoLabel.text = self.logic.describeModel(path) if path and os.path.isfile(path) else ""
        self.updateButtons()

    def onOutputChanged(self, path):
        qt.QSettings().setValue(OUTPUT_SETTING, path)
        self.updateButtons()

    def updateButtons(self, *_):
        from GVSLSegmentationLib import validate_inputs
        segmenting = self.segmentRun is not None and self.segmentRun.job.running
        reason = validate_inputs(self.ui.inputVolumeSelector.currentNode(), self.ui.modelPathLineEdit.currentPath)
        self.ui.applyButton.enabled = reason is None and not segmenting
        self.ui.applyButton.toolTip = reason or "Segment the input volume."
        self.ui.cancelButton.enabled = segmenting
        if reason and not segmenting:
            self.ui.statusLabel.text = reason
        training = self.finetuneRun is not None and self.finetuneRun.job.running
        ftReason = None
        if not self.pairs:
            ftReason = "Add at least one (volume, segmentation) pair."
        elif not self.ui.outputFolderPathLineEdit.currentPath:
            ftReason = "Choose an output folder for the fine-tuned model."
        self.ui.startFinetuneButton.enabled = ftReason is None and not training
        self.ui.startFinetuneButton.toolTip = ftReason or "Fine-tune in the background."
        self.ui.cancelFinetuneButton.enabled = training
        if ftReason and not training:
            self.ui.finetuneStatusLabel.text = ftReason

    # -- segment -----------------------------------------------------------------------------
    def onApply(self):
        with slicer.util.tryWithErrorDisplay("GVSL segmentation failed to start.", waitCursor=True):
            for warning in self.logic.ensureDependencies():
                slicer.util.warningDisplay(warning)
            from gvsl_slicer.qtjob import JobPoller
            from GVSLSegmentationLib import SegmentationRun
            self.segmentRun = SegmentationRun(
                self.ui.inputVolumeSelector.currentNode(), self.ui.modelPathLineEdit.currentPath,
                self.ui.deviceComboBox.currentData or "auto", self.ui.outputSegmentationSelector.currentNode(),
                show_3d_surfaces=self.ui.show3DCheckBox.checked, on_event=self.onSegmentEvent).start()
            self.pollers.append(JobPoller(self.segmentRun.job, self.onSegmentFinished).start())
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Segmenting in the background..."
            self.updateButtons()

    def onSegmentEvent(self, record):
        if record.get("event") == "stage":
            stages = ("preprocess", "network", "export")
            stage = record.get("stage")
            self.ui.progressBar.value = int(100 * (stages.index(stage) if stage in stages else 0) / len(stages))
            self.ui.statusLabel.text = record.get("message", "")
        elif record.get("event") == "warning":
            logging.warning(f"GVSL: {record.get('message')}")

    def onCancelSegment(self):
        if self.segmentRun is not None:
            self.segmentRun.cancel()

    def onSegmentFinished(self, job):
        with slicer.util.tryWithErrorDisplay("GVSL segmentation failed.", waitCursor=True):
            state = self.segmentRun.poll()
            if state == "failed":
                raise RuntimeError(self.segmentRun.job.error)
            if state == "done":
                node = self.segmentRun.segmentation_node
                self.ui.outputSegmentationSelector.setCurrentNode(node)
                self.ui.progressBar.value = 100
                self.ui.statusLabel.text = f"Done: {node.GetName()}."
                slicer.util.setSliceViewerLayers(background=self.segmentRun.volume_node, fit=True)
            else:
                self.ui.statusLabel.text = "Cancelled."
        self.updateButtons()

    # -- fine-tune ---------------------------------------------------------------------------
    def onAddPair(self):
        volume, seg = self.ui.pairVolumeSelector.currentNode(), self.ui.pairSegmentationSelector.currentNode()
        if volume is None or seg is None:
            slicer.util.warningDisplay("Select a volume and its segmentation first.")
            return
        self.pairs.append((volume.GetID(), seg.GetID()))
        self.ui.pairsListWidget.addItem(f"{volume.GetName()}  +  {seg.GetName()}")
        self.updateButtons()

    def onRemovePair(self):
        row = self.ui.pairsListWidget.currentRow
        if 0 <= row < len(self.pairs):
            del self.pairs[row]
            self.ui.pairsListWidget.takeItem(row)
        self.updateButtons()

    def _pairNodes(self):
        nodes = [(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s)) for v, s in self.pairs]
        missing = [i + 1 for i, (v, s) in enumerate(nodes) if v is None or s is None]
        if missing:
            raise ValueError(f"pair(s) {missing} refer to nodes that were removed from the scene; remove those pairs.")
        return nodes

    def onStartFinetune(self):
        with slicer.util.tryWithErrorDisplay("Could not start GVSL fine-tuning.", waitCursor=True):
            for warning in self.logic.ensureDependencies():
                slicer.util.warningDisplay(warning)
            from gvsl_slicer.qtjob import JobPoller
            from GVSLSegmentationLib import start_finetune
            pairs = self._pairNodes()
            validation = pairs[-1:] if len(pairs) >= 3 else None
            training = pairs[:-1] if validation else pairs
            self.finetuneRun = start_finetune(
                training, self.ui.taskComboBox.currentText, self.ui.outputFolderPathLineEdit.currentPath,
                validation_pairs=validation, pretrained=self.ui.pretrainedPathLineEdit.currentPath or None,
                scene=slicer.mrmlScene, on_event=self.onFinetuneEvent, mode=self.ui.modeComboBox.currentText,
                steps=self.ui.stepsSpinBox.value, crop=self.ui.cropSpinBox.value,
                device=self.ui.deviceComboBox.currentData or "auto")
            slicer.modules.plots.logic().ShowChartInLayout(self.finetuneRun.chart.chart)
            self.pollers.append(JobPoller(self.finetuneRun.job, self.onFinetuneFinished).start())
            self.ui.finetuneProgressBar.maximum = self.ui.stepsSpinBox.value
            self.ui.finetuneStatusLabel.text = "Starting (reading and preprocessing the pairs)..."
            self.ui.useModelButton.enabled = False
            self.updateButtons()

    def onFinetuneEvent(self, record):
        event = record.get("event")
        if event == "step":
            self.ui.finetuneProgressBar.maximum = int(record.get("total", 1))
            self.ui.finetuneProgressBar.value = int(record.get("step", 0))
            eta = record.get("eta_s")
            self.ui.finetuneStatusLabel.text = (f"step {record['step']}/{record['total']}, loss {record.get('loss', 0):.4f}"
                                                + (f", about {eta / 60:.0f} min left" if eta else ""))
        elif event == "validation":
            best = record.get("best") or {}
            self.ui.finetuneStatusLabel.text = (f"validation Dice {record.get('dice_mean', 0):.3f} "
                                                f"(best {best.get('value', 0):.3f} at step {best.get('step')})")
        elif event == "warning":
            logging.warning(f"GVSL: {record.get('message')}")

    def onCancelFinetune(self):
        if self.finetuneRun is not None:
            self.finetuneRun.cancel()
            self.ui.finetuneStatusLabel.text = "Cancelling: stopping after the current step, keeping the checkpoint..."

    def onFinetuneFinished(self, job):
        with slicer.util.tryWithErrorDisplay("GVSL fine-tuning finished with an error.", waitCursor=True):
            state = self.finetuneRun.poll()
            if state == "failed":
                raise RuntimeError(self.finetuneRun.error)
            path = self.finetuneRun.model_path
            self.ui.useModelButton.enabled = bool(path) and os.path.isfile(path)
            self.ui.finetuneStatusLabel.text = (f"Done: {path}" if state == "done" else
                                                f"Cancelled; the last checkpoint is kept in {path}.")
        self.updateButtons()

    def onUseModel(self):
        path = self.finetuneRun.model_path if self.finetuneRun is not None else ""
        if path:
            self.logic.setCurrentModel(path)
            self.ui.modelPathLineEdit.currentPath = path


class GVSLSegmentationLogic(ScriptedLoadableModuleLogic):
    """Dependency check, the current model, and the console API (GVSLSegmentationLib)."""

    def ensureDependencies(self):
        from gvsl_slicer import dependencies
        return dependencies.ensure()

    def currentModelPath(self):
        try:
            from gvsl_slicer.models import ModelStore
            return ModelStore().current_path("segmentation") or ""
        except Exception:  # noqa: BLE001 - no models folder yet
            return ""

    def setCurrentModel(self, path):
        from gvsl_slicer.models import ModelStore
        return ModelStore().add(path, expected_kind="segmentation", make_current=True)

    def describeModel(self, path):
        try:
            from gvsl.checkpoint import load_checkpoint
            ckpt = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            return f"Not usable: {exc}"
        if ckpt.get("kind") != "segmentation":
            return f"A '{ckpt.get('kind')}' checkpoint: segmentation needs a model from the Fine-tune section."
        labels = ckpt.get("labels", {})
        dice = (ckpt.get("scores") or {}).get("dice_mean")
        return (f"{labels.get('name', '?')}: {len(labels.get('values', []))} structures, {ckpt.get('step')} steps"
                + (f", validation Dice {dice:.3f}" if isinstance(dice, float) else ""))

    def segmentVolume(self, volumeNode, modelPath, device="auto", **kwargs):
        from GVSLSegmentationLib import segment_volume
        return segment_volume(volumeNode, modelPath, device, **kwargs)

    def finetune(self, pairs, task, outputDir, **options):
        from GVSLSegmentationLib import finetune_from_nodes
        return finetune_from_nodes(pairs, task, outputDir, **options)


class GVSLSegmentationTest(ScriptedLoadableModuleTest):
    """Fine-tunes a real tiny model on two synthetic heart phantoms, then segments a third one."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_FinetuneAndSegment()

    def test_FinetuneAndSegment(self):
        import tempfile

        import numpy as np
        import gvsl_mrml
        from gvsl.phantoms import make_heart_phantom
        from gvsl.segdata import resolve_table
        from GVSLSegmentationLib import labels_to_segmentation
        table = resolve_table("heart")
        self.delayDisplay("Making heart phantoms")
        pairs = []
        for i in range(3):
            ct, labels, _ = make_heart_phantom(32, 100 + i)
            volume = gvsl_mrml.sitk_to_volume_node(ct, slicer.mrmlScene, f"phantom{i}")
            pairs.append((volume, labels_to_segmentation(labels, table, slicer.mrmlScene, f"truth{i}", volume)))
        before = slicer.util.arrayFromVolume(pairs[2][0]).copy()
        logic = GVSLSegmentationLogic()
        with tempfile.TemporaryDirectory() as folder:
            self.delayDisplay("Fine-tuning a tiny model (CPU, a few steps)")
            summary = logic.finetune(pairs[:2], "heart", folder, validation_pairs=pairs[1:2], steps=4, crop=16,
                                     batch_size=1, validate_every=4, save_every=0, device="cpu",
                                     model_channels=[8, 8, 8, 8, 16, 8, 8, 8, 8])
            self.assertEqual(summary["status"], "done")
            self.delayDisplay("Segmenting the held-out phantom")
            node = logic.segmentVolume(pairs[2][0], summary["model_path"], "cpu", show_3d_surfaces=True)
        self.assertEqual(gvsl_mrml.segment_names(node), table.names)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(pairs[2][0]), before))
        self.assertEqual(node.GetNodeReference("GVSL.input").GetID(), pairs[2][0].GetID())
        self.delayDisplay("Test passed")
