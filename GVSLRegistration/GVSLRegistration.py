"""GVSL Registration: align a moving volume to a fixed one with a GVSL model (affine + deformable).

Thin Slicer module: the panel wires widgets to GVSLRegistrationLib (MRML logic, no Qt), which
calls the gvsl engine through gvsl_mrml. PyTorch is checked (and offered for install through
the PyTorch extension) on first use, never at import.
"""
import importlib.util
import logging
import os

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

MODEL_PATH_SETTING = "GVSL/ModelPath"
TORCH_REQUIREMENT = ">=2.4"


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
            "aligned), the Jacobian determinant, and optionally a propagated segmentation with Dice.")
        self.parent.acknowledgementText = (
            "GVSL: Geometric Visual Similarity Learning in 3D Medical Image Self-supervised Pre-training, "
            "Y. He et al., CVPR 2023.")


class GVSLRegistrationWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.outputs = None
        self.cancelToken = None
        self._devicesChecked = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GVSLRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLRegistrationLogic()

        self.ui.deviceComboBox.addItems(["auto", "cpu"])
        self.ui.modelPathLineEdit.currentPath = qt.QSettings().value(MODEL_PATH_SETTING, "") or ""
        for selector in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyState)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.overlayAffineRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.overlayNetworkRadioButton.connect("toggled(bool)", self.onOverlayChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOverlayChanged)
        self.ui.dvfComboBox.connect("currentIndexChanged(int)", self.onDvfChanged)
        self.updateApplyState()

    def enter(self):
        self.refreshDevices()
        self.updateApplyState()

    def refreshDevices(self):
        """Offer CUDA / MPS when an installed PyTorch sees a GPU (checked only if torch is installed)."""
        if self._devicesChecked or importlib.util.find_spec("torch") is None:
            return
        self._devicesChecked = True
        try:
            import torch
            mps = getattr(torch.backends, "mps", None)
            for name, available in (("cuda", torch.cuda.is_available()),
                                    ("mps", bool(mps is not None and mps.is_available()))):
                if available and self.ui.deviceComboBox.findText(name) < 0:
                    self.ui.deviceComboBox.addItem(name)
        except Exception as exc:  # a broken torch install must not break the panel
            logging.warning(f"GVSL: could not check CUDA: {exc}")

    def onModelPathChanged(self, path):
        qt.QSettings().setValue(MODEL_PATH_SETTING, path)
        self.updateApplyState()

    def updateApplyState(self, *_):
        from GVSLRegistrationLib import validate_inputs
        reason = validate_inputs(self.ui.fixedVolumeSelector.currentNode(), self.ui.movingVolumeSelector.currentNode(),
                                 self.ui.modelPathLineEdit.currentPath)
        busy = self.cancelToken is not None
        self.ui.applyButton.enabled = reason is None and not busy
        self.ui.applyButton.toolTip = reason or "Register the moving volume to the fixed volume."
        self.ui.statusLabel.text = reason or ""

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
        slicer.app.processEvents()

    def onCancel(self):
        if self.cancelToken is not None:
            self.cancelToken.cancel("cancelled by the user")

    def onApply(self):
        with slicer.util.tryWithErrorDisplay("GVSL registration failed.", waitCursor=True):
            if not self.logic.ensureTorch():
                return
            from gvsl.progress import Cancelled, CancelToken
            from GVSLRegistrationLib import RegistrationOutputs, format_metrics
            ui = self.ui
            outputs = RegistrationOutputs(
                warped_volume=ui.warpedVolumeSelector.currentNode(),
                warped_affine_volume=ui.warpedAffineVolumeSelector.currentNode(),
                affine_transform=ui.affineTransformSelector.currentNode(),
                deformable_transform=ui.deformableTransformSelector.currentNode(),
                jacobian_volume=ui.jacobianVolumeSelector.currentNode(),
                propagated_segmentation=ui.propagatedSegmentationSelector.currentNode())
            self.cancelToken = CancelToken()
            ui.cancelButton.enabled = True
            self.updateApplyState()
            try:
                self.outputs = self.logic.run(
                    ui.fixedVolumeSelector.currentNode(), ui.movingVolumeSelector.currentNode(),
                    ui.modelPathLineEdit.currentPath, ui.deviceComboBox.currentText,
                    moving_segmentation=ui.movingSegmentationSelector.currentNode(),
                    fixed_segmentation=ui.fixedSegmentationSelector.currentNode(),
                    outputs=outputs, progress=self.onProgress, cancel=self.cancelToken,
                    refine=int(ui.refineStepsSpinBox.value))
            except Cancelled:
                ui.statusLabel.text = "Cancelled."
                return
            finally:
                self.cancelToken = None
                ui.cancelButton.enabled = False
                ui.progressBar.value = 0
                self.updateApplyState()
            ui.progressBar.value = 100
            ui.metricsLabel.text = format_metrics(self.outputs.metrics)
            ui.overlayDeformableRadioButton.checked = True
            self.onOverlayChanged()
            self.onDvfChanged()

    def onOverlayChanged(self, *_):
        if self.outputs is None or self.outputs.warped_volume is None:
            return
        from GVSLRegistrationLib import choose_overlay, show_overlay
        stage = ("affine" if self.ui.overlayAffineRadioButton.checked
                 else "network" if self.ui.overlayNetworkRadioButton.checked else "deformable")
        warped = choose_overlay(self.outputs, stage)
        show_overlay(self.outputs.fixed_volume, warped, self.ui.opacitySliderWidget.value)

    def onDvfChanged(self, *_):
        if self.outputs is None or self.outputs.deformable_transform is None:
            return
        from GVSLRegistrationLib import set_dvf_display
        set_dvf_display(self.outputs.deformable_transform, self.ui.dvfComboBox.currentText)


class GVSLRegistrationLogic(ScriptedLoadableModuleLogic):
    """Checks PyTorch, then delegates to GVSLRegistrationLib.register_volumes."""

    def ensureTorch(self, askConfirmation=True):
        """True when torch can be imported; otherwise offer the install via the PyTorch extension."""
        if importlib.util.find_spec("torch") is not None:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("GVSL needs PyTorch: install the 'PyTorch' extension from the Extensions "
                               "Manager, restart Slicer, and try again.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            slicer.util.warningDisplay("PyTorch was not installed, so GVSL cannot run. Use the PyTorch Utils "
                                       "module to install it (choose a CUDA backend to use the GPU).")
            return False
        return True

    def run(self, fixedNode, movingNode, modelPath, device="auto", **kwargs):
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
