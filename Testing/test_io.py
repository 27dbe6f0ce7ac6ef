"""gvsl.io: finding/reading volumes (files, DICOM), presets, isotropic resampling, the cache, bad inputs."""
import math
import os
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl import io
from gvsl.io import VolumeCache, VolumeError, VolumeWarning


def _volume(shape_zyx=(6, 7, 8), spacing=(0.8, 0.9, 1.5), origin=(10.0, -20.0, 30.0), seed=0,
            dtype=np.int16, direction=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1000, size=shape_zyx).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _rotation_direction(deg=20.0):
    a = math.radians(deg)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


def _write_dicom_series(image: sitk.Image, folder, series_uid: str):
    """One file per slice with the tags ImageSeriesReader needs for geometry."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    date = time.strftime("%Y%m%d")
    orient = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                             direction[1], direction[4], direction[7]))
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        tags = {"0008|0060": "CT", "0008|0020": date, "0008|0030": "120000",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
                "0020|0037": orient,
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0013": str(k + 1), "0018|0050": f"{image.GetSpacing()[2]:.6f}",
                "0008|0018": f"{series_uid}.{k + 1}", "0010|0010": "Phantom^Test",
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"slice_{k:03d}.dcm"))
        writer.Execute(sl)


def _same_geometry(a: sitk.Image, b: sitk.Image, tol=1e-4):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha", ".nii", ".mhd"])
def test_read_file_formats_keep_values_and_geometry(tmp_path, ext):
    img = _volume(direction=_rotation_direction())
    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(img, str(path))
    out = io.read_volume(path)
    _same_geometry(out, img)
    assert out.GetDimension() == 3 and out.GetNumberOfComponentsPerPixel() == 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))


def test_dicom_series_folder_is_found_and_read(tmp_path):
    img = _volume(shape_zyx=(6, 10, 9), spacing=(0.7, 0.7, 2.0), origin=(-50.0, 12.5, 100.0))
    series = tmp_path / "patient" / "ct_series"
    _write_dicom_series(img, series, "1.2.826.0.1.3680043.2.1125.2.1")
    # the series folder itself, and its parent folder (subfolders holding DICOM series count)
    assert io.find_volumes([series]) == [series.absolute()]
    assert io.find_volumes([tmp_path / "patient"]) == [series.absolute()]
    out = io.read_volume(series)
    _same_geometry(out, img, tol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
    cached = VolumeCache(tmp_path / "cache", "ct", 1.0).get(series)
    assert cached.shape == (11, 8, 7)  # the preprocessing grid: ceil((n-1)*sp/1mm)+1 = 5*2+1, 6.3->7+1, 5.6->6+1


def test_folder_with_two_dicom_series_gives_one_path_per_series(tmp_path):
    a = _volume(shape_zyx=(5, 6, 6), seed=1)
    b = _volume(shape_zyx=(4, 6, 6), seed=2)
    folder = tmp_path / "mixed"
    _write_dicom_series(a, folder, "1.2.826.0.1.3680043.2.1125.3.1")
    b_slices = tmp_path / "tmp_b"
    _write_dicom_series(b, b_slices, "1.2.826.0.1.3680043.2.1125.3.2")
    for f in b_slices.iterdir():
        f.rename(folder / f"b_{f.name}")
    found = io.find_volumes([folder])
    assert [p.name for p in found] == ["1.2.826.0.1.3680043.2.1125.3.1", "1.2.826.0.1.3680043.2.1125.3.2"]
    depths = [io.read_volume(p).GetDepth() for p in found]
    assert depths == [5, 4]
    with pytest.raises(VolumeError, match="2 DICOM series"):
        io.read_volume(folder)


def test_find_volumes_sorted_deduplicated_and_filtered(tmp_path):
    for name in ("b.nrrd", "a.nii.gz", "c.mha"):
        sitk.WriteImage(_volume(), str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("not an image")
    sitk.WriteImage(_volume(), str(tmp_path / ".hidden.nii.gz"))
    found = io.find_volumes([tmp_path, tmp_path / "a.nii.gz"])
    assert [p.name for p in found] == ["a.nii.gz", "b.nrrd", "c.mha"]
    with pytest.raises(VolumeError, match="not a supported volume file"):
        io.find_volumes([tmp_path / "notes.txt"])
    with pytest.raises(VolumeError, match="does not exist"):
        io.find_volumes([tmp_path / "missing.nii.gz"])


# ---------------------------------------------------------------------------------------
# presets and resampling
# ---------------------------------------------------------------------------------------
# (the intensity presets and the grid/resampling tests moved to test_preprocessing.py with the code)


def test_preprocess_warns_when_ct_preset_gets_non_hu_data():
    img = sitk.GetImageFromArray(np.full((5, 5, 5), 300, np.uint16))
    with pytest.warns(VolumeWarning, match="does not look like CT"):
        io.preprocess(img, "ct")


# ---------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------
def test_volume_cache_reads_each_file_once_and_hits_disk_cache(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(_volume(spacing=(1.0, 1.0, 2.0)), str(path))
    reads = []
    real_read = io.read_volume
    monkeypatch.setattr(io, "read_volume", lambda p: (reads.append(p), real_read(p))[1])
    cache_dir = tmp_path / "cache"
    cache = VolumeCache(cache_dir, "ct", 1.0)
    a = cache.get(path)
    b = cache.get(path)
    assert len(reads) == 1 and a is b
    assert a.dtype == np.float32 and a.shape == (11, 7, 8)  # (z, y, x), z (6 - 1) x 2 mm + 1 -> 11
    expect = sitk.GetArrayFromImage(io.preprocess(real_read(path), "ct", 1.0))
    np.testing.assert_array_equal(a, expect)
    assert [f.suffix for f in cache_dir.iterdir()] == [".npy"]  # no temp files left
    # a new cache instance finds the disk entry: still one read
    c = VolumeCache(cache_dir, "ct", 1.0).get(path)
    assert len(reads) == 1
    np.testing.assert_array_equal(c, a)
    # another preset or spacing is another entry; a changed file is read again
    VolumeCache(cache_dir, "mr", 1.0).get(path)
    assert len(reads) == 2
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    VolumeCache(cache_dir, "ct", 1.0).get(path)
    assert len(reads) == 3
    # memory-only cache
    mem = VolumeCache(None, "ct", 1.0)
    mem.get(path)
    mem.get(path)
    assert len(reads) == 4


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(_volume(), str(path))
    cache = VolumeCache(tmp_path / "cache", "ct", 1.0)
    good = cache.get(path)
    entry = next((tmp_path / "cache").iterdir())
    entry.write_bytes(b"broken")
    with pytest.warns(VolumeWarning, match="unreadable"):
        again = VolumeCache(tmp_path / "cache", "ct", 1.0).get(path)
    np.testing.assert_array_equal(again, good)


def test_load_volumes_needs_two_and_reports_progress(tmp_path):
    from gvsl.progress import Progress
    for i in range(3):
        sitk.WriteImage(_volume(seed=i), str(tmp_path / f"v{i}.nii.gz"))
    records = []
    progress = Progress(0, mode="none", callback=records.append, task="load")
    arrays, paths = io.load_volumes([tmp_path], "ct", cache_dir=tmp_path / "cache", progress=progress)
    assert [p.name for p in paths] == ["v0.nii.gz", "v1.nii.gz", "v2.nii.gz"]
    assert len(arrays) == 3 and all(a.dtype == np.float32 and 0 <= a.min() <= a.max() <= 1 for a in arrays)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["total"] == 3
    with pytest.raises(VolumeError, match="need at least two volumes .* found 1: .*v0.nii.gz"):
        io.load_volumes([tmp_path / "v0.nii.gz"], "ct")


# ---------------------------------------------------------------------------------------
# bad inputs: each message names the problem
# ---------------------------------------------------------------------------------------
def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.int16)), str(path))
    with pytest.raises(VolumeError, match=r"2D image of size 40 x 30.*3D volume is needed"):
        io.read_volume(path)


def test_4d_image_is_refused(tmp_path):
    path = tmp_path / "timeseries.nii.gz"
    frames = [sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    with pytest.raises(VolumeError, match=r"4D image .*pick one channel/time point.*ExtractImageFilter"):
        io.read_volume(path)


def test_vector_rgb_image_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(VolumeError, match=r"3 components per voxel.*pick one channel"):
        io.read_volume(path)


def test_too_thin_volume_is_refused(tmp_path):
    path = tmp_path / "thin.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 20, 20), np.int16)), str(path))
    with pytest.raises(VolumeError, match=r"20 x 20 x 3 voxels; each axis needs at least 4"):
        io.read_volume(path)


def test_empty_folder(tmp_path):
    with pytest.raises(VolumeError, match=r"no volumes found in .*expected .nii/.nii.gz/.nrrd/.mha/.mhd files "
                                          "or DICOM series folders"):
        io.find_volumes([tmp_path])
    with pytest.raises(VolumeError, match="holds no DICOM series"):
        io.read_volume(tmp_path)


def test_unreadable_file_names_the_file_and_the_reason(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(VolumeError) as err:
        io.read_volume(path)
    msg = str(err.value)
    assert "could not read garbage.nii.gz" in msg and "Unable to determine ImageIO reader" in msg
    assert "Exception thrown" not in msg and "\n" not in msg


def test_nan_voxels_replaced_by_finite_minimum_with_warning(tmp_path):
    arr = np.arange(125, dtype=np.float32).reshape(5, 5, 5) - 10.0
    arr[1, 2, 3] = np.nan
    arr[2, 2, 2] = np.inf
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.warns(VolumeWarning, match=r"nan.nrrd: replaced 2 NaN/Inf voxel\(s\) by the image's finite minimum -10"):
        out = sitk.GetArrayFromImage(io.read_volume(path))
    assert np.all(np.isfinite(out)) and out[1, 2, 3] == -10.0 and out[2, 2, 2] == -10.0
    assert out[4, 4, 4] == arr[4, 4, 4]
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 5, 5), np.nan, np.float32)), str(path))
    with pytest.raises(VolumeError, match="every voxel is NaN or infinite"):
        io.read_volume(path)


def test_integer_volume_is_returned_unchanged(tmp_path):
    img = _volume()
    path = tmp_path / "int.nii.gz"
    sitk.WriteImage(img, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = io.read_volume(path)
    assert out.GetPixelID() == sitk.sitkInt16


def test_write_image_atomic_leaves_no_temp_files(tmp_path):
    img = _volume()
    target = tmp_path / "sub" / "out.nii.gz"
    io.write_image_atomic(img, target)
    assert [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(target))), sitk.GetArrayFromImage(img))
