"""Bad inputs and faults, tried as a user would: one clear line, one JSON event, nothing lost.

**To add a case, add one line to CASES**: ``Case(name, command line, message fragment, exit
code, unchanged)``. The command line uses the placeholders of :func:`world` ({fixed}, {moving},
{model}, {out}, ...; {out} is a fresh folder per case). Each case runs ``gvsl`` in-process with
``--progress json`` and asserts: the exit code; exactly one ``error:`` line on stderr holding the
fragment, no traceback; exactly one ``{"event": "error"}`` line on stdout holding it; and that
every file named in ``unchanged`` (world keys; folders: every file inside) has the same sha256
before and after.

The dangerous cases of issue 8 that need more than one command (disk full, two processes, a
silently incomplete SimpleITK write, replacing an earlier result) are the tests after the table.
"""
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl import phantoms
from gvsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [8, 16, 32, 64, 128, 64, 32, 16, 8]  # reduced-width network (GroupNorm needs C % 8 == 0)


def digest(path: Path) -> dict:
    """{relative name: sha256} of a file, or of every file below a folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _write_dicom(image: sitk.Image, folder: Path, skip=()):
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        sl = image[:, :, k]
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
                           "0020|000e": "1.2.826.0.1.3680043.2.1125.9.1", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                           "0020|0013": str(k + 1), "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.1.{k + 1}",
                           "0028|1052": "0", "0028|1053": "1"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k:03d}.dcm"))
        writer.Execute(sl)


def _unwritable(base: Path) -> Path:
    """A folder this process cannot write into (chmod 500; as root, who ignores it, sysfs)."""
    if os.geteuid() != 0:
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return ro
    return Path("/sys/kernel")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs every case can name: small phantoms, a tiny model, broken files, earlier runs."""
    root = tmp_path_factory.mktemp("world")
    images = phantoms.write_phantoms("heart", 3, 32, 0, root / "ph")
    w = {"root": root, "scans": root / "scans", "movdir": root / "movdir"}
    for key, folder, src in (("fixed", "scans", images[0]), ("moving", "movdir", images[1])):
        w[folder].mkdir()
        w[key] = w[folder] / f"{key}.nii.gz"
        shutil.copy(src, w[key])
    w["labels"] = root / "ph" / "labels" / images[0].name
    w["images"] = root / "ph" / "images"
    data = w["fixed"].read_bytes()
    w["truncated"] = root / "truncated.nii.gz"                    # the first 60 % of a gzip stream
    w["truncated"].write_bytes(data[: len(data) * 6 // 10])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(w["fixed"]))).astype(np.float32)
    for key, fill in (("nan", None), ("allnan", np.nan)):
        a = arr.copy()
        if fill is None:
            a[3, 4, 5] = np.nan
            a[6, 7, 8] = np.inf
        else:
            a[:] = fill
        img = sitk.GetImageFromArray(a)
        img.CopyInformation(sitk.ReadImage(str(w["fixed"])))
        w[key] = root / f"{key}.nii.gz"
        sitk.WriteImage(img, str(w[key]))
    w["dicom_gap"] = root / "dicom_gap"
    _write_dicom(sitk.Cast(sitk.ReadImage(str(w["fixed"])), sitk.sitkInt16), w["dicom_gap"], skip=(10,))
    tiny = sitk.Image([6, 6, 6], sitk.sitkInt16) - 1000                 # 6^3 voxels of 100 mm: a wrong header?
    tiny.SetSpacing((100.0, 100.0, 100.0))
    w["coarse"] = root / "coarse" / "coarse.nii.gz"
    w["coarse"].parent.mkdir()
    sitk.WriteImage(tiny, str(w["coarse"]))
    w["a_file"] = root / "a_file.txt"
    w["a_file"].write_text("not a folder")
    w["unwritable"] = _unwritable(root)

    import torch

    from gvsl.checkpoint import save_checkpoint
    from gvsl.network import GVSL, ModelConfig
    from gvsl.train import PretrainConfig, pretrain
    torch.manual_seed(0)
    w["model"] = save_checkpoint(root / "model.pt", GVSL(ModelConfig(channels=tuple(TINY))))
    w["finished"] = root / "finished"                               # a finished pre-training run
    pretrain(PretrainConfig(images=[str(p) for p in images], out=str(w["finished"]), steps=1, batch_size=1,
                            crop=16, device="cpu", save_every=0, progress="none", model_channels=TINY))
    w["earlier"] = root / "earlier"                                 # an earlier registration's results
    assert main(["register", "--fixed", str(w["fixed"]), "--moving", str(w["moving"]), "--model", str(w["model"]),
                 "--out", str(w["earlier"]), "--device", "cpu", "--progress", "none",
                 "--fixed-labels", str(w["labels"]), "--moving-labels", str(w["labels"])]) == 0
    return w


@dataclass(frozen=True)
class Case:
    name: str
    args: str                 # the command line after `gvsl`, with {placeholders} from world
    message: str              # a fragment of the one error line
    exit_code: int = 2
    unchanged: Tuple[str, ...] = ()


REG = "register --fixed {fixed} --moving {moving} --model {model} --device cpu"
PRE = "pretrain --images {images} --steps 1 --crop 16 --batch-size 1 --device cpu"
CASES = [
    # the dangerous ones (issue 8, cases 1, 3, 5)
    Case("truncated .nii.gz (register)", REG.replace("{moving}", "{truncated}") + " --out {out}",
         "is truncated or corrupt", 2, ("truncated", "fixed")),
    Case("truncated .nii.gz (pretrain)", "pretrain --images {truncated} {fixed} --steps 1 --device cpu --out {out}",
         "truncated.nii.gz is truncated or corrupt", 2, ("truncated",)),
    Case("new pretrain into a finished run", PRE + " --out {finished}",
         "holds a finished pre-training run", 2, ("finished",)),
    Case("register --out = the moving image's folder", REG + " --out {movdir}",
         "holds the input --moving", 2, ("movdir",)),
    # the bad ones
    Case("all-NaN NIfTI", REG.replace("{moving}", "{allnan}") + " --out {out}",
         "every voxel is NaN or infinite", 2, ("allnan",)),
    Case("DICOM series with a missing slice", REG.replace("{moving}", "{dicom_gap}") + " --out {out}",
         "slices are not evenly spaced", 2, ("dicom_gap",)),
    Case("--out is an existing file", REG + " --out {a_file}", "is a file, not a folder", 2, ("a_file",)),
    Case("unwritable --out (register)", REG + " --out {unwritable}", "while writing into --out", 1),
    Case("unwritable --out (pretrain)", PRE + " --out {unwritable}/x", "while creating --out", 1),
    Case("register into an earlier registration", REG + " --out {earlier}",
         "already holds the results of an earlier registration", 2, ("earlier",)),
    Case("register into a pre-training folder", REG + " --overwrite --out {finished}",
         "holds the results of a 'gvsl pretrain' run", 2, ("finished",)),
    Case("pretrain --resume --overwrite", PRE + " --resume --overwrite --out {finished}",
         "pass one of them", 2, ("finished",)),
    Case("--lr -1", PRE + " --lr -1 --out {out}", "--lr must be > 0 (got -1)"),
    Case("--lr nan", PRE + " --lr nan --out {out}", "--lr must be a finite number (got 'nan')"),
    Case("--spacing 0", PRE + " --spacing 0 --out {out}", "--spacing must be > 0 (got 0)"),
    Case("--steps 0", PRE + " --steps 0 --out {out}", "--steps must be >= 1 (got 0)"),
    Case("--network-spacing nan", REG + " --network-spacing nan --out {out}",
         "--network-spacing must be a finite number (got 'nan')"),
    Case("--network-spacing inf", REG + " --network-spacing inf --out {out}", "must be a finite number"),
    Case("--max-network-voxels 0", REG + " --max-network-voxels 0 --out {out}", "--max-network-voxels must be >= 8 (got 0)"),
    Case("unwritable --out (phantom)", "phantom --n 1 --size 32 --out {unwritable}", "while writing into --out", 1),
    Case("--out is a file (demo)", "demo --n 3 --size 32 --steps 1 --out {a_file}", "is a file, not a folder", 2,
         ("a_file",)),
    Case("6^3 voxels at 100 mm -> a 501^3 grid (pretrain)",
         "pretrain --images {coarse} {fixed} --steps 1 --crop 16 --device cpu --out {out}",
         "coarse.nii.gz: resampling its 500 x 500 x 500 mm extent to 1 mm gives a 501 x 501 x 501 grid", 2, ("coarse",)),
    Case("model inside --out", REG.replace("{model}", "{finished}/gvsl_final.pt") + " --out {finished}",
         "holds the input --model", 2, ("finished",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, world, tmp_path, capsys):
    names = {k: str(v) for k, v in world.items()}
    names["out"] = str(tmp_path / "out")
    names["images"] = str(world["images"])
    argv = shlex.split(case.args.format(**names)) + ["--progress", "json"]
    before = {k: digest(world[k]) for k in case.unchanged}
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert rc == case.exit_code, (out, err)
    error_lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(error_lines) == 1 and case.message in error_lines[0], err
    assert "Traceback" not in err
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and case.message in errors[0]["message"] and errors[0]["exit_code"] == rc, out
    assert not any(e["event"] == "stage" for e in events), "refused only after starting the computation"
    assert seconds < 20
    for k in case.unchanged:
        assert digest(world[k]) == before[k], f"{k} changed"


# ---------------------------------------------------------------------------------------
# cases that need more than one command
# ---------------------------------------------------------------------------------------
def test_nan_in_nifti_is_replaced_with_a_warning_line_and_in_metrics(world, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(shlex.split(f"register --fixed {world['fixed']} --moving {world['nan']} --model {world['model']} "
                          f"--device cpu --out {out} --progress json --no-overview"))
    stdout = capsys.readouterr().out
    assert rc == 0
    warnings = [json.loads(ln) for ln in stdout.splitlines() if '"warning"' in ln]
    text = "nan.nii.gz: replaced 2 NaN/Inf voxel(s) by the image's finite minimum"
    assert any(text in w["message"] for w in warnings), stdout
    assert any(text in w for w in json.loads((out / "metrics.json").read_text())["warnings"])


def test_overwrite_replaces_an_earlier_registration_and_removes_its_leftovers(world, tmp_path, capsys):
    out = tmp_path / "earlier"
    shutil.copytree(world["earlier"], out)
    assert {"overview.png", "warped_labels.nii.gz"} <= {p.name for p in out.iterdir()}
    old_warped = digest(out / "warped.nii.gz")
    rc = main(shlex.split(f"register --fixed {world['fixed']} --moving {world['fixed']} --model {world['model']} "
                          f"--device cpu --out {out} --overwrite --no-overview --progress none"))
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert "overview.png" not in names and "warped_labels.nii.gz" not in names, names  # nothing stale
    assert not [n for n in names if n.startswith(".")], names                          # no temp/staging
    assert digest(out / "warped.nii.gz") != old_warped


_LIMITED_REGISTER = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.path.insert(0, sys.argv[2])
from gvsl.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_disk_full_during_register_keeps_the_previous_result(world, tmp_path):
    """Issue 8 case 2: the 'disk' (a file-size limit of 30 kB) fills while the outputs are written."""
    out = tmp_path / "earlier"
    shutil.copytree(world["earlier"], out)
    before = digest(out)
    cmd = [sys.executable, "-c", _LIMITED_REGISTER, "30000", str(ROOT / "GVSLExtension"), "register",
           "--fixed", str(world["fixed"]), "--moving", str(world["moving"]), "--model", str(world["model"]),
           "--device", "cpu", "--out", str(out), "--overwrite", "--progress", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [json.loads(ln) for ln in proc.stdout.splitlines() if '"error"' in ln]
    assert len(errors) == 1 and errors[0]["message"].startswith("disk full: nothing replaced"), proc.stdout
    assert errors[0]["kind"] == "environment"
    assert "Traceback" not in proc.stderr
    assert digest(out) == before                      # every earlier result intact, nothing added


def test_simpleitk_silently_incomplete_output_is_an_error(world, tmp_path, capsys, monkeypatch):
    """Issue 8 case 6: SimpleITK returns normally after a truncated write; it is caught."""
    out = tmp_path / "earlier"
    shutil.copytree(world["earlier"], out)
    before = digest(out)
    real = sitk.WriteImage

    def truncating(image, name, *args):
        real(image, name, *args)
        if "displacement" in name:
            Path(name).write_bytes(b"")  # what a full disk left: a 0-byte displacement.nii.gz
    monkeypatch.setattr(sitk, "WriteImage", truncating)
    rc = main(shlex.split(f"register --fixed {world['fixed']} --moving {world['moving']} --model {world['model']} "
                          f"--device cpu --out {out} --overwrite --progress none"))
    err = capsys.readouterr().err
    assert rc == 1 and "disk full: nothing replaced: writing" in err and "displacement.nii.gz" in err, err
    assert digest(out) == before


_HOLDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from gvsl.train import PretrainConfig, pretrain
images = sys.argv[3:]
pretrain(PretrainConfig(images=images, out=sys.argv[2], steps=100000, batch_size=1, crop=16, device="cpu",
                        save_every=0, progress="json", model_channels=[8, 16, 32, 64, 128, 64, 32, 16, 8]))
"""


def test_two_pretrain_processes_into_one_out(world, tmp_path, capsys):
    """Issue 8 case 4: the second process is refused, naming the first one's PID; run 1 is intact."""
    out = tmp_path / "run"
    images = sorted(str(p) for p in world["images"].iterdir())
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT / "GVSLExtension"), str(out), *images],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in first.stdout:  # wait until run 1 trains (its config.json is written)
            if '"event": "step"' in line:
                break
        config_before = digest(out / "config.json")
        rc = main(shlex.split(f"pretrain --images {world['images']} --out {out} --steps 1 --crop 16 --device cpu "
                              "--progress json"))
        stdout, err = capsys.readouterr()
        assert rc == 2 and f"another gvsl pretrain (PID {first.pid}" in err, err
        assert sum('"event": "error"' in ln for ln in stdout.splitlines()) == 1
        assert digest(out / "config.json") == config_before
    finally:
        first.send_signal(signal.SIGTERM)  # run 1 saves and stops cleanly
        first.communicate(timeout=120)
    assert (out / "gvsl_last.pt").exists() and not (out / ".gvsl.lock").exists()


def test_unexpected_exception_is_one_line_one_event_and_a_log(world, tmp_path, capsys, monkeypatch):
    from gvsl import registration

    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug deep inside")
    monkeypatch.setattr(registration, "register", boom)
    monkeypatch.setenv("GVSL_LOG_DIR", str(tmp_path / "logs"))
    rc = main(shlex.split(f"register --fixed {world['fixed']} --moving {world['moving']} --model {world['model']} "
                          f"--device cpu --out {tmp_path / 'out'} --progress json"))
    out, err = capsys.readouterr()
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    errors = [e for e in events if e["event"] == "error"]
    assert rc == 1 and len(errors) == 1 and errors[0]["kind"] == "unexpected"
    assert "unexpected ZeroDivisionError: a bug deep inside" in errors[0]["message"]
    log = Path(errors[0]["log"])
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "boom" in log.read_text()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


_LIMITED_TINY_PRETRAIN = r"""
import dataclasses, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.path.insert(0, sys.argv[2])
from gvsl import train
from gvsl.cli import main
real = train.pretrain   # the command as typed, with a reduced-width network for speed
train.pretrain = lambda config, **kw: real(dataclasses.replace(config, model_channels=[8, 16, 32, 64, 128, 64, 32, 16, 8]), **kw)
sys.exit(main(sys.argv[3:]))
"""


def test_disk_full_during_pretraining_is_one_clear_line(world, tmp_path):
    """torch.save raises its own RuntimeError on EFBIG/ENOSPC: still 'disk full', exit 1."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", _LIMITED_TINY_PRETRAIN, "200000", str(ROOT / "GVSLExtension"), "pretrain",
           "--images", str(world["images"]), "--out", str(out), "--steps", "1", "--crop", "16",
           "--batch-size", "1", "--device", "cpu", "--save-every", "0", "--progress", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [json.loads(ln) for ln in proc.stdout.splitlines() if '"event": "error"' in ln]
    assert len(errors) == 1 and errors[0]["message"].startswith("disk full: nothing replaced"), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    assert not [p.name for p in out.iterdir() if ".gvsl-tmp-" in p.name]  # no temp file left behind
