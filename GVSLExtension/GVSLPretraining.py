"""GVSL Pretraining: self-supervised GVSL pre-training on volumes loaded in Slicer, in the background.

Thin Slicer module: the panel wires widgets to GVSLPretrainingLib (MRML logic, no Qt), which runs
`gvsl pretrain` as a child process through gvsl_slicer.jobs. Dependencies (PyTorch, MONAI) are
checked on Start, never at import; the models folder lists every GVSL model of this user.
"""
import logging
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

OUTPUT_SETTING = "GVSL/PretrainingOutputFolder"


class GVSLPretraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GVSL Pretraining"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["GVSL for Slicer developers"]
        self.parent.helpText = (
            "Pre-train a GVSL network (He et al., CVPR 2023) without labels on the loaded volumes: it learns "
            "to register pairs of different scans and to restore corrupted copies. Runs in the background "
            "(progress, live loss chart, Cancel keeps the checkpoint, Resume continues). The finished model "
            "becomes the current GVSL model of the other GVSL modules.")
        self.parent.acknowledgementText = (
            "GVSL: Geometric Visual Similarity Learning in 3D Medical Image Self-supervised Pre-training, "
            "Y. He et al., CVPR 2023.")


class GVSLPretrainingWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.run = None
        self.poller = None
        self._devicesChecked = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GVSLPretraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GVSLPretrainingLogic()
        self.ui.outputFolderPathLineEdit.currentPath = qt.QSettings().value(OUTPUT_SETTING, "") or ""
        self.ui.volumesSelector.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.useFolderCheckBox.connect("toggled(bool)", self.updateButtons)
        self.ui.imagesFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.outputFolderPathLineEdit.connect("currentPathChanged(QString)", self.onOutputChanged)
        self.ui.startButton.connect("clicked(bool)", lambda: self.onStart(resume=False))
        self.ui.resumeButton.connect("clicked(bool)", lambda: self.onStart(resume=True))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.setCurrentModelButton.connect("clicked(bool)", self.onSetCurrentModel)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.refreshModels()
        self.updateButtons()

    def enter(self):
        self.refreshDevices()
        self.refreshModels()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        if self.run is not None and self.run.state == "running":
            self.run.cancel()

    def onSceneStartClose(self, caller, event):
        if self.run is not None:
            self.run.chart = None  # the chart nodes go with the scene; training continues

    def refreshDevices(self):
        if self._devicesChecked:
            return
        self._devicesChecked = True
        from gvsl_slicer.devices import list_devices
        combo = self.ui.deviceComboBox
        combo.clear()
        for value, label in list_devices():
            combo.addItem(label, value)

    def refreshModels(self):
        from gvsl_slicer.models import ModelStore
        store = ModelStore()
        self.ui.modelsListWidget.clear()
        for entry in store.list():
            item = qt.QListWidgetItem(entry.describe())
            item.setData(qt.Qt.UserRole, entry.id)
            item.setToolTip(f"{entry.path}\nsha256 {entry.sha256}\npreprocessing {entry.preprocessing}")
            self.ui.modelsListWidget.addItem(item)
        current = store.current()
        self.ui.currentModelLabel.text = f"Current model: {current.describe() if current else 'none'}"
        self.ui.modelsListWidget.toolTip = f"Models folder: {store.root}"

    def onOutputChanged(self, path):
        qt.QSettings().setValue(OUTPUT_SETTING, path)
        self.updateButtons()

    def _inputProblem(self):
        from GVSLPretrainingLib import volumes_problem
        if self.ui.useFolderCheckBox.checked:
            folder = self.ui.imagesFolderPathLineEdit.currentPath
            return "" if folder and os.path.isdir(folder) else "Choose the images folder."
        return volumes_problem(list(self.ui.volumesSelector.checkedNodes()))

    def updateButtons(self, *_):
        from GVSLPretrainingLib import can_resume
        busy = self.run is not None and self.run.state == "running"
        output = self.ui.outputFolderPathLineEdit.currentPath
        reason = self._inputProblem() or ("" if output else "Choose an output folder.")
        self.ui.startButton.enabled = not busy and not reason
        self.ui.startButton.toolTip = reason or "Export the volumes and start pre-training in the background."
        self.ui.resumeButton.enabled = not busy and not reason and bool(output) and can_resume(output)
        self.ui.cancelButton.enabled = busy
        if not busy and reason:
            self.ui.statusLabel.text = reason

    def _options(self):
        channels = self.ui.modelChannelsLineEdit.text.split()
        return dict(preset=self.ui.presetComboBox.currentText, steps=self.ui.stepsSpinBox.value,
                    batch_size=self.ui.batchSizeSpinBox.value, crop=self.ui.cropSpinBox.value,
                    device=self.ui.deviceComboBox.currentData or "auto", spacing_mm=self.ui.spacingSpinBox.value,
                    lr=float(self.ui.learningRateLineEdit.text), save_every=self.ui.saveEverySpinBox.value,
                    init=self.ui.initPathLineEdit.currentPath or None,
                    model_channels=[int(c) for c in channels] if channels else None)

    def onStart(self, resume=False):
        with slicer.util.tryWithErrorDisplay("Could not start GVSL pre-training.", waitCursor=True):
            for warning in self.logic.ensureDependencies():
                slicer.util.warningDisplay(warning)
            from gvsl_slicer.qtjob import JobPoller
            from GVSLPretrainingLib import start_pretraining
            self.ui.logTextEdit.clear()
            useFolder = self.ui.useFolderCheckBox.checked
            self.run = start_pretraining(
                None if useFolder else list(self.ui.volumesSelector.checkedNodes()),
                self.ui.outputFolderPathLineEdit.currentPath, resume=resume,
                images_folder=self.ui.imagesFolderPathLineEdit.currentPath if useFolder else None,
                scene=slicer.mrmlScene, on_event=self.onEvent, on_log=self.ui.logTextEdit.appendPlainText,
                **self._options())
            if self.run.chart is not None:
                slicer.modules.plots.logic().ShowChartInLayout(self.run.chart.chart)
            self.poller = JobPoller(self.run.job, self.onFinished).start()
            self.ui.statusLabel.text = "Starting (reading and preprocessing the volumes)..."
            self.updateButtons()

    def onEvent(self, record):
        event = record.get("event")
        if event == "step":
            p = self.run.progress()
            self.ui.progressBar.maximum = p["total"]
            self.ui.progressBar.value = p["step"]
            self.ui.statusLabel.text = self.run.status_text()
        elif event in ("loading", "loaded", "start", "resumed", "checkpoint", "warning"):
            text = record.get("message") or " ".join(f"{k}={v}" for k, v in record.items() if k not in ("task",))
            self.ui.logTextEdit.appendPlainText(f"[{event}] {text}")
            if event == "warning":
                logging.warning(f"GVSL: {text}")

    def onCancel(self):
        if self.run is not None:
            self.run.cancel()
            self.ui.statusLabel.text = "Cancelling: stopping after the current step and saving the checkpoint..."
            self.ui.cancelButton.enabled = False

    def onFinished(self, job):
        with slicer.util.tryWithErrorDisplay("GVSL pre-training finished with an error.", waitCursor=True):
            self.run.poll()  # registers the final checkpoint in the models folder
            self.ui.statusLabel.text = self.run.status_text()
            if self.run.state == "failed":
                raise RuntimeError(self.run.error)
        self.refreshModels()
        self.updateButtons()

    def _selectedModelId(self):
        item = self.ui.modelsListWidget.currentItem()
        return item.data(qt.Qt.UserRole) if item is not None else None

    def onSetCurrentModel(self):
        modelId = self._selectedModelId()
        if modelId:
            from gvsl_slicer.models import ModelStore
            ModelStore().set_current(modelId)
            self.refreshModels()

    def onImportWeights(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import GVSL weights", "", "GVSL weights (*.pt *.pth)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not import these weights.", waitCursor=True):
            self.logic.ensureDependencies()
            from gvsl_slicer.models import ModelStore
            entry = ModelStore().import_weights(path)
            slicer.util.infoDisplay(f"Imported {entry.describe()} into {os.path.dirname(entry.path)}.")
        self.refreshModels()


class GVSLPretrainingLogic(ScriptedLoadableModuleLogic):
    """Dependency check, then GVSLPretrainingLib (``pretrain`` / ``start_pretraining``)."""

    def ensureDependencies(self):
        from gvsl_slicer import dependencies
        return dependencies.ensure()

    def pretrain(self, volumeNodes, outputDir, **options):
        from GVSLPretrainingLib import pretrain
        return pretrain(volumeNodes, outputDir, **options)


class GVSLPretrainingTest(ScriptedLoadableModuleTest):
    """A real (tiny) background pre-training on synthetic volumes, cancelled and resumed."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_PretrainCancelResume()

    def test_PretrainCancelResume(self):
        import tempfile
        import time

        import numpy as np
        GVSLPretrainingLogic().ensureDependencies()  # testing mode: raises if missing, never installs
        import GVSLPretrainingLib
        from gvsl_slicer.models import ModelStore
        nodes = []
        rng = np.random.default_rng(0)
        for i in range(3):
            z, y, x = np.mgrid[0:32, 0:32, 0:32].astype(np.float32)
            blob = np.exp(-((x - 16 - i) ** 2 + (y - 15) ** 2 + (z - 16 + i) ** 2) / 60.0)
            nodes.append(slicer.util.addVolumeFromArray((-1000 + 1400 * blob + rng.normal(0, 20, blob.shape))
                                                        .astype("float32"), name=f"vol{i}"))
        tiny = dict(crop=16, batch_size=1, spacing_mm=2.5, device="cpu", save_every=1,
                    model_channels=(8, 8, 16, 16, 32, 16, 16, 8, 8))
        with tempfile.TemporaryDirectory() as folder:
            store = ModelStore(os.path.join(folder, "models"))
            out = os.path.join(folder, "run")
            self.delayDisplay("Pre-training in the background")
            run = GVSLPretrainingLib.start_pretraining(nodes, out, steps=100, store=store, **tiny)
            while run.poll() == "running" and run.progress()["step"] < 2:
                slicer.app.processEvents()
                time.sleep(0.05)
            run.cancel()
            self.assertEqual(run.wait(timeout=120), "cancelled", run.error)
            self.assertTrue(GVSLPretrainingLib.can_resume(out))
            run = GVSLPretrainingLib.pretrain(nodes, out, steps=run.summary["step"] + 1, resume=True,
                                              store=store, **tiny)
            self.assertEqual(run.state, "done")
            self.assertEqual(store.current().id, run.model_entry.id)
        self.delayDisplay("Test passed")
