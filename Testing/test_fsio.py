"""gvsl.fsio (verified atomic writers), gvsl.errors (base class, warning channel), gvsl.verify
(NIfTI/DICOM checks below SimpleITK), and the layers: no torch for --help and phantom."""
import errno
import gzip
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl import errors, fsio, verify
from gvsl.errors import DiskFullError, EnvironmentFault, GVSLError

ROOT = Path(__file__).resolve().parents[1]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _image(n=16, dtype=np.float32):
    arr = (np.arange(n ** 3, dtype=np.float64).reshape(n, n, n) % 97).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.5, 2.0))
    return img


# ---------------------------------------------------------------------------------------
# every error class derives from the one base class
# ---------------------------------------------------------------------------------------
def test_every_error_class_is_a_gvsl_error():
    from gvsl import augment, checkpoint, device, io, labels, outputs, registration, train
    for cls in (io.VolumeError, checkpoint.CheckpointError, device.DeviceError, registration.RegistrationError,
                train.TrainingError, augment.AugmentError, labels.LabelError, outputs.OutputFolderError,
                errors.DiskFullError, errors.EnvironmentFault, errors.UsageError):
        assert issubclass(cls, GVSLError), cls
    assert issubclass(io.VolumeError, ValueError)  # callers catching ValueError keep working
    assert errors.EnvironmentFault.exit_code == 1 and GVSLError.exit_code == 2


def test_environment_fault_messages():
    fault = errors.environment_fault(OSError(errno.EACCES, "Permission denied", "/x/y"), "writing --out /x")
    assert isinstance(fault, EnvironmentFault) and not isinstance(fault, DiskFullError)
    assert str(fault) == ("permission denied while writing --out /x (/x/y): choose a folder you can write to, "
                          "or fix its permissions")
    assert isinstance(errors.environment_fault(OSError(errno.ENOSPC, "No space")), DiskFullError)
    assert errors.is_environment_fault(OSError(errno.EROFS, "ro")) and not errors.is_environment_fault(ValueError())


def test_warn_goes_to_the_sink_else_python_warnings():
    got = []
    with errors.warnings_to(got.append):
        errors.warn("a.nii: something repaired")
        warnings.warn("a library warning")  # Python warnings are routed too, message only
    assert got == ["a.nii: something repaired", "a library warning"]
    with pytest.warns(errors.GVSLWarning, match="outside"):
        errors.warn("outside any sink")
    rec = errors.WarningRecorder(forward=got.append)
    with errors.warnings_to(rec):
        errors.warn("kept")
    assert rec.messages == ["kept"] and got[-1] == "kept"


# ---------------------------------------------------------------------------------------
# atomic, verified writes
# ---------------------------------------------------------------------------------------
def test_atomic_write_text_and_temp_names(tmp_path):
    path = fsio.atomic_write_text(tmp_path / "a.json", '{"x": 1}')
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    t = fsio.temp_path(tmp_path / "warped.nii.gz")
    assert t.name.startswith(".warped.nii.gz.gvsl-tmp-") and t.name.endswith(".nii.gz")
    assert f"-{os.getpid()}-" in t.name


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = fsio.atomic_write_text(tmp_path / "m.json", '{"old": true}')
    before = sha(target)

    def half_then_fail(tmp):
        Path(tmp).write_text('{"new": ')
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=r"^disk full: nothing replaced: writing .*m.json failed .*m.json keeps "
                                            r"its previous content"):
        fsio.atomic_write(target, half_then_fail)
    assert sha(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


@pytest.mark.parametrize("name,content", [
    ("x.nii.gz", lambda: gzip.compress(b"\0" * 5000)[:-30]),      # cut gzip stream
    ("x.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40),          # no IEND chunk
    ("x.pt", lambda: b"PK\x03\x04" + b"\0" * 100),                 # no zip directory
    ("x.json", lambda: b'{"a": '),
    ("x.txt", lambda: b""),                                        # 0 bytes
])
def test_incomplete_files_are_never_renamed_into_place(tmp_path, name, content):
    target = tmp_path / name
    target.write_bytes(b"previous result")
    with pytest.raises(DiskFullError, match="nothing replaced.*incomplete"):
        fsio.atomic_write(target, lambda tmp: Path(tmp).write_bytes(content()))
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale_pt = tmp_path / f".gvsl_last.pt{fsio.TEMP_TAG}{dead}-abcd1234.pt"  # a kill -9 during a checkpoint
    stale_txt = tmp_path / f".notes.txt{fsio.TEMP_TAG}{dead}-00ff00ff.txt"
    alive = tmp_path / f".gvsl_last.pt{fsio.TEMP_TAG}{os.getpid()}-abcd1234.pt"  # a write in progress
    user_file = tmp_path / ".hidden_user_file"
    for p in (stale_pt, stale_txt, alive, user_file):
        p.write_bytes(b"x" * 100)
    fsio.atomic_write_text(tmp_path / "notes.txt", "hello")  # cleans its own destination's temps
    assert not stale_txt.exists() and stale_pt.exists()
    assert fsio.remove_stale_temps(tmp_path) == [stale_pt]   # the whole folder (gvsl.outputs does this)
    assert alive.exists() and user_file.exists()


def test_write_image_verifies_and_simpleitk_silent_failure_is_caught(tmp_path, monkeypatch):
    img = _image()
    path = fsio.write_image(img, tmp_path / "w.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(img))
    before = sha(path)
    real = sitk.WriteImage

    def silent_truncating_write(image, name, compress=True):  # what SimpleITK does on a full disk
        real(image, name, compress)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(sitk, "WriteImage", silent_truncating_write)
    for name in ("w.nii.gz", "u.nii", "u.nrrd", "u.mha"):
        with pytest.raises(DiskFullError, match="disk full: nothing replaced"):
            fsio.write_image(_image() * 2, tmp_path / name, compress=name != "u.nii")
    assert sha(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nii.gz"]
    with pytest.raises(GVSLError, match="header \\+ data"):
        fsio.write_image(img, tmp_path / "a.mhd")


def test_write_transform_reads_back(tmp_path):
    tf = sitk.AffineTransform(3)
    tf.SetTranslation((1.0, 2.0, 3.0))
    path = fsio.write_transform(tf, tmp_path / "affine.tfm")
    assert sitk.ReadTransform(str(path)).GetParameters()[-3:] == (1.0, 2.0, 3.0)


_FSIZE_CHILD = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
from gvsl import fsio, errors
import SimpleITK as sitk, numpy as np
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))   # bytes: the 'disk' fills mid-file
img = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
try:
    fsio.write_image(img, sys.argv[2])
except errors.DiskFullError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("name", ["big.nii.gz", "big.nii"])
def test_file_size_limit_in_a_child_process_is_disk_full(tmp_path, name):
    target = tmp_path / name
    sitk.WriteImage(_image(8), str(target))
    before = sha(target)
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(ROOT / "GVSLExtension"), str(target)],
                         capture_output=True, text=True, timeout=60)
    assert "REFUSED disk full: nothing replaced" in out.stdout, out.stdout + out.stderr
    assert sha(target) == before and [p.name for p in tmp_path.iterdir()] == [name]


# ---------------------------------------------------------------------------------------
# NIfTI / DICOM checks (gvsl.verify) against independent facts
# ---------------------------------------------------------------------------------------
def test_nifti_layout_matches_simpleitk_file(tmp_path):
    img = _image(10, np.int16)
    sitk.WriteImage(img, str(tmp_path / "a.nii"))
    layout, bad = verify.check_nifti(tmp_path / "a.nii")
    assert layout.n_voxels == 1000 and layout.dtype == np.dtype("<i2") and bad.size == 0
    assert layout.total_bytes == os.path.getsize(tmp_path / "a.nii")  # vox_offset 352 + 2000 bytes


def test_nifti_non_finite_positions_are_the_zyx_array_positions(tmp_path):
    arr = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[5, 0, 7] = -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "n.nii.gz"))
    _, bad = verify.check_nifti(tmp_path / "n.nii.gz")
    assert sorted(bad.tolist()) == sorted(np.flatnonzero(~np.isfinite(arr)).tolist())


def test_dicom_slice_gaps():
    normal = (0.0, 0.0, 1.0)
    even = [(0, 0, 1.5 * k) for k in range(10)]
    assert verify.dicom_slice_gaps(even, normal) is None
    missing = even[:4] + even[5:]
    assert "1.5 mm apart, but 3 mm between slices 4 and 5 of 9 (about 1 slice(s) missing" in \
        verify.dicom_slice_gaps(missing, normal)
    assert "same position" in verify.dicom_slice_gaps(even[:3] + even[2:], normal)
    jitter = [(0, 0, 1.5 * k + (0.001 if k % 2 else 0)) for k in range(10)]
    assert verify.dicom_slice_gaps(jitter, normal) is None  # rounding in the tags is fine


# ---------------------------------------------------------------------------------------
# layers: --help and phantom import no torch; no import cycle
# ---------------------------------------------------------------------------------------
_NO_TORCH = r"""
import sys, contextlib, io
sys.path.insert(0, sys.argv[1])
from gvsl.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
assert "torch" not in sys.modules, "gvsl --help imported torch"
rc = main(["phantom", "--n", "1", "--size", "32", "--out", sys.argv[2], "--progress", "none"])
assert rc == 0
assert "torch" not in sys.modules, "gvsl phantom imported torch"
import gvsl.fsio, gvsl.errors, gvsl.outputs, gvsl.verify, gvsl.io
assert "torch" not in sys.modules, "the writers / io imported torch"
print("OK")
"""


def test_help_and_phantom_do_not_import_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(ROOT / "GVSLExtension"), str(tmp_path / "ph")],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def test_no_module_imports_the_cli():
    for path in (ROOT / "GVSLExtension" / "gvsl").glob("*.py"):
        if path.name not in ("cli.py", "__main__.py"):
            assert "gvsl.cli" not in path.read_text(encoding="utf-8"), f"{path.name} imports gvsl.cli (an import cycle)"
