"""GVSL Registration: align a moving volume to a fixed one with a GVSL model (affine + deformable).

Thin Slicer module: the panel wires widgets to GVSLRegistrationLib (MRML logic, no Qt). Apply runs
`gvsl register` in the background (gvsl_slicer.jobs), so Slicer never freezes and Cancel stops it
within a second; the results become nodes like GVSLRegistrationLib.register_volumes makes them.
Choices are kept in a parameter node (saved with the scene). Dependencies are checked on Apply.
"""
import logging
import os
import pathlib
from typing import Annotated, Union

import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

LabelsNode = Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]


class GVSLRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GVSL Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for Slicer developers"]
        self.parent.helpText = (
            "Register a moving volume to a fixed volume with a GVSL model (He et al., CVPR 2023): one "
            "network pass predicts an affine and a deformable transform. Outputs: warped volumes "
            "(affine only, and affine + deformable), a linear and a grid transform (the linear one is "
            "nested under the grid one: put the moving volume under the linear transform to see it "
            "aligned; take it out again before the next registration, never harden it), the Jacobian "
            "determinant, and optionally a propagated segmentation with Dice. Runs in the background.")
        self.parent.acknowledgementText = (
            "GVSL: Geometric Visual Similarity Learning in 3D Medical Image Self-supervised Pre-training, "
            "Y. He et al., CVPR 2023.")


@parameterNodeWrapper
class GVSLRegistrationParameterNode:
    fixedVolume: slicer.vtkMRMLScalarVolumeNode
    movingVolume: slicer.vtkMRMLScalarVolumeNode
    movingSegmentation: LabelsNode
    fixedSegmentation: LabelsNode
    modelPath: pathlib.Path
    warpedVolume: slicer.vtkMRMLScalarVolumeNode
    warpedAffineVolume: slicer.vtkMRMLScalarVolumeNode
    affineTransform: slicer.vtkMRMLLinearTransformNode
    deformableTransform: slicer.vtkMRMLGridTransformNode
    jacobianVolume: slicer.vtkMRMLScalarVolumeNode
    propagatedSegmentation: slicer.vtkMRMLSegmentationNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    refineSteps: Annotated[int, WithinRange(0, 5000)] = 150  # saved with the scene, like the nodes


class GVSLRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.poller = None
        self.session = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._devicesChecked = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GVSLRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLRegistrationLogic()
        from GVSLRegistrationLib import RegistrationSession
        self.session = RegistrationSession(slicer.mrmlScene)
        self.ui.deviceComboBox.addItem("auto", "auto")
        self.ui.deviceComboBox.addItem("cpu", "cpu")
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.removeGvslTransformButton.connect("clicked(bool)", self.onRemoveGvslTransform)
        self.ui.overlayAffineRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.overlayNetworkRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.dvfComboBox.connect("currentIndexChanged(int)", self.onDvfChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.cancelButton.enabled = False
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.session is not None:
            self.session.close()
        if self.job is not None and self.job.state == "running":
            self.job.kill()

    def enter(self):
        self.initializeParameterNode()
        self.refreshDevices()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyState)

    def onSceneStartClose(self, caller, event):
        if self.job is not None and self.job.state == "running":
            self.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        modelPath = str(self._parameterNode.modelPath)
        if modelPath in ("", "."):
            from gvsl_slicer.models import ModelStore
            current = ModelStore().current_path()
            if current:
                self._parameterNode.modelPath = pathlib.Path(current)

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyState)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyState)
        self.updateApplyState()

    def refreshDevices(self):
        if self._devicesChecked:
            return
        self._devicesChecked = True
        from gvsl_slicer.devices import list_devices
        self.ui.deviceComboBox.clear()
        for value, label in list_devices():
            self.ui.deviceComboBox.addItem(label, value)

    def _modelPath(self):
        path = str(self._parameterNode.modelPath) if self._parameterNode else ""
        return "" if path == "." else path

    def updateApplyState(self, *_):
        from GVSLRegistrationLib import gvsl_transform_of, validate_inputs
        p = self._parameterNode
        busy = self.job is not None and self.job.state == "running"
        reason = "Loading..." if p is None else validate_inputs(p.fixedVolume, p.movingVolume, self._modelPath())
        self.ui.applyButton.enabled = reason is None and not busy
        self.ui.applyButton.toolTip = reason or "Register the moving volume to the fixed volume (in the background)."
        self.ui.removeGvslTransformButton.visible = p is not None and gvsl_transform_of(p.movingVolume) is not None
        if not busy:
            self.ui.statusLabel.text = reason or ""

    def onRemoveGvslTransform(self):
        from GVSLRegistrationLib import remove_gvsl_transform
        if not remove_gvsl_transform(self._parameterNode.movingVolume):
            slicer.util.warningDisplay("The GVSL transform is not the moving volume's direct parent; take the "
                                       "volume out of its other transforms in the Data module.")
        self.updateApplyState()

    def onProgress(self, record):
        if record.get("event") == "stage":
            stages = max(int(record.get("stages", 4)), 1)
            self.ui.progressBar.value = int(100 * int(record.get("index", 0)) / stages)
            self.ui.statusLabel.text = record.get("message", "")
        elif record.get("event") == "step" and record.get("stage") == "refine":
            self.ui.statusLabel.text = (f"refining on this pair: step {record.get('step')}/{record.get('total')} "
                                        f"(local NCC {record.get('ncc', 0.0):.3f})")
        elif record.get("event") == "warning":
            logging.warning(f"GVSL: {record.get('message')}")

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("GVSL registration failed to start.", waitCursor=True):
            for warning in self.logic.ensureDependencies():
                slicer.util.warningDisplay(warning)
            from gvsl_slicer.qtjob import JobPoller
            from GVSLRegistrationLib import RegistrationOutputs, start_registration
            p = self._parameterNode
            outputs = RegistrationOutputs(
                warped_volume=p.warpedVolume, warped_affine_volume=p.warpedAffineVolume,
                affine_transform=p.affineTransform, deformable_transform=p.deformableTransform,
                jacobian_volume=p.jacobianVolume, propagated_segmentation=p.propagatedSegmentation)
            self.job = start_registration(p.fixedVolume, p.movingVolume, self._modelPath(),
                                          self.ui.deviceComboBox.currentData or "auto",
                                          moving_segmentation=p.movingSegmentation,
                                          fixed_segmentation=p.fixedSegmentation, outputs=outputs,
                                          on_event=self.onProgress, refine=int(p.refineSteps))
            self.poller = JobPoller(self.job, self.onFinished, interval_ms=100).start()
            self.ui.cancelButton.enabled = True
            self.ui.statusLabel.text = "Starting the registration..."
            self.updateApplyState()

    def onFinished(self, job):
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.value = 100 if job.state == "done" else 0
        self.updateApplyState()
        if job.state == "cancelled":
            self.ui.statusLabel.text = "Cancelled."
            return
        if job.state == "failed":
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"GVSL registration failed: {job.error}")
            return
        from GVSLRegistrationLib import format_metrics
        self.session.set_outputs(job.outputs)
        p = self._parameterNode
        if p is not None:
            p.warpedVolume, p.warpedAffineVolume = job.outputs.warped_volume, job.outputs.warped_affine_volume
            p.affineTransform, p.deformableTransform = job.outputs.affine_transform, job.outputs.deformable_transform
            p.jacobianVolume, p.propagatedSegmentation = job.outputs.jacobian_volume, job.outputs.propagated_segmentation
        self.ui.metricsLabel.text = format_metrics(job.outputs.metrics)
        self.ui.statusLabel.text = "Done."
        self.ui.overlayDeformableRadioButton.checked = True
        self.onOverlayChanged()
        self.onDvfChanged()

    def onOverlayChanged(self, *_):
        stage = ("affine" if self.ui.overlayAffineRadioButton.checked
                 else "network" if self.ui.overlayNetworkRadioButton.checked else "deformable")
        self.session.show(stage, self.ui.opacitySliderWidget.value)

    def onOpacityChanged(self, value):
        self.session.set_opacity(value)

    def onDvfChanged(self, *_):
        self.session.show_dvf(self.ui.dvfComboBox.currentText)


class GVSLRegistrationLogic(ScriptedLoadableModuleLogic):
    """Dependency check, the parameter node, and GVSLRegistrationLib.register_volumes."""

    def getParameterNode(self):
        return GVSLRegistrationParameterNode(super().getParameterNode())

    def ensureDependencies(self):
        """torch (PyTorch extension), MONAI, matplotlib: one confirmation; testing mode never installs."""
        from gvsl_slicer import dependencies
        return dependencies.ensure()

    def ensureTorch(self, askConfirmation=True):
        """True when the dependencies are usable (kept for scripts written against earlier versions)."""
        from gvsl_slicer import dependencies
        dependencies.ensure(confirm=None if askConfirmation else (lambda text: True))
        return True

    def run(self, fixedNode, movingNode, modelPath, device="auto", **kwargs):
        """Blocking, in-process registration (console/tests); the panel uses start_registration."""
        from GVSLRegistrationLib import register_volumes
        return register_volumes(fixedNode, movingNode, modelPath, device, **kwargs)


class GVSLRegistrationTest(ScriptedLoadableModuleTest):
    """Runs a real registration (random-weight GVSL model) on small synthetic volumes."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_RegisterSyntheticVolumes()

    def _volume(self, name, shift, spacing):
        import numpy as np
        size = (20, 18, 16)  # (x, y, z)
        z, y, x = np.mgrid[0:size[2], 0:size[1], 0:size[0]].astype(float)
        pts = np.stack([x * spacing[0], y * spacing[1], z * spacing[2]], -1) - 12.0 - np.array(shift)
        blob = np.exp(-(((pts - [2, -1, 0]) / [7, 6, 5]) ** 2).sum(-1)) * 200.0 + 20.0
        node = slicer.util.addVolumeFromArray(blob.astype("float32"), name=name)
        node.SetSpacing(*spacing)
        node.SetOrigin(-12.0, -12.0, -10.0)
        return node

    def test_RegisterSyntheticVolumes(self):
        import tempfile

        import numpy as np
        self.assertTrue(GVSLRegistrationLogic().ensureTorch(askConfirmation=False))
        import gvsl.registration
        import gvsl_mrml
        import torch
        from gvsl import GVSL, ModelConfig, load_model, save_checkpoint
        self.delayDisplay("Creating volumes and a random-weight GVSL model")
        fixed = self._volume("fixed", (0.0, 0.0, 0.0), (1.25, 1.3, 1.4))
        moving = self._volume("moving", (1.5, -1.0, 0.5), (1.3, 1.2, 1.5))
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "gvsl_random.pt")
            save_checkpoint(path, GVSL(ModelConfig(channels=(8, 16, 32, 64, 128, 64, 32, 16, 8))))
            self.delayDisplay("Registering")
            outputs = GVSLRegistrationLogic().run(fixed, moving, path, "auto")
            reference = gvsl.registration.register(gvsl_mrml.volume_node_to_sitk(fixed),
                                                   gvsl_mrml.volume_node_to_sitk(moving), load_model(path), "auto")
        for name in ("warped_volume", "warped_affine_volume", "affine_transform", "deformable_transform",
                     "jacobian_volume"):
            node = getattr(outputs, name)
            self.assertIsNotNone(node, name)
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(node.GetID()), name)
        self.assertEqual(outputs.warped_volume.GetName(), "moving warped (GVSL)")
        self.assertEqual(outputs.affine_transform.GetNodeReference("GVSL.moving").GetID(), moving.GetID())
        # the node hierarchy maps a fixed point like the engine's composite (RAS = LPS with x, y negated)
        p_ras = np.array([-2.0, -3.0, -2.0])  # inside the fixed volume
        p_lps = p_ras * [-1, -1, 1]
        expected_ras = np.array(reference.composite.TransformPoint(p_lps.tolist())) * [-1, -1, 1]
        fromWorld = vtk.vtkGeneralTransform()
        outputs.affine_transform.GetTransformFromWorld(fromWorld)
        mapped = np.array(fromWorld.TransformPoint(p_ras.tolist()))
        self.assertLess(np.abs(mapped - expected_ras).max(), 0.1)
        self.assertIn("ncc_after", outputs.metrics)
        self.delayDisplay("Test passed")
