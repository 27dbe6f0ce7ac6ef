"""gvsl.outputs: output folders that protect results and inputs (unit level; the commands are
tested end to end in test_bad_inputs.py)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvsl import outputs
from gvsl.errors import EnvironmentFault, UsageError
from gvsl.outputs import FolderLock, FolderLockedError, OutputFolderError, RunFolder

ROOT = Path(__file__).resolve().parents[1]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot write into: chmod 500, or (as root, who ignores that) sysfs."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        yield ro
        ro.chmod(0o700)
    elif Path("/sys/kernel").is_dir():
        probe = Path("/sys/kernel/.gvsl-probe")
        try:
            probe.write_bytes(b"")
        except OSError:
            yield Path("/sys/kernel")
        else:  # pragma: no cover
            probe.unlink()
            pytest.skip("no unwritable folder available to root here")
    else:  # pragma: no cover
        pytest.skip("no unwritable folder available to root here")


def _fill(folder: Path, names, text="old"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_text(f"{text} {n}")


def test_out_that_is_a_file_or_unwritable_is_refused_before_anything(tmp_path, unwritable_dir):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OutputFolderError, match=r"--out .*file.txt is a file, not a folder"):
        RunFolder(f, "register").prepare()
    with pytest.raises(OutputFolderError, match="a part of the path is a file"):
        RunFolder(f / "sub", "register").prepare()
    with pytest.raises(EnvironmentFault, match=r"(permission denied|not permitted) while writing into --out"):
        RunFolder(unwritable_dir, "register").prepare()
    with pytest.raises(EnvironmentFault, match=r"(permission denied|not permitted) while creating --out"):
        RunFolder(unwritable_dir / "new", "register").prepare()


def test_out_holding_an_input_is_refused(tmp_path):
    (tmp_path / "scans").mkdir()
    moving = tmp_path / "scans" / "moving.nii.gz"
    moving.write_bytes(b"x")
    with pytest.raises(OutputFolderError, match=r"--out .*scans holds the input --moving .*moving.nii.gz"):
        RunFolder(tmp_path / "scans", "register", inputs={"--moving": moving}).prepare()
    with pytest.raises(OutputFolderError, match="holds the input --images"):  # an input below --out
        RunFolder(tmp_path, "pretrain", inputs={"--images": [str(tmp_path / "scans")]}).prepare()
    dicom_series = tmp_path / "scans" / "1.2.3.4"  # a virtual <folder>/<SeriesInstanceUID> path
    with pytest.raises(OutputFolderError, match="holds the input --fixed"):
        RunFolder(tmp_path / "scans", "register", inputs={"--fixed": dicom_series}).prepare()
    RunFolder(tmp_path / "out", "register", inputs={"--moving": moving, "--fixed-labels": None}).prepare()


def test_register_results_refused_then_replaced_only_at_commit(tmp_path):
    out = tmp_path / "out"
    _fill(out, ["warped.nii.gz", "overview.png", "warped_labels.nii.gz", "notes-of-the-user.txt"])
    before = {p.name: sha(p) for p in out.iterdir()}
    with pytest.raises(OutputFolderError, match=r"already holds the results of an earlier registration "
                                                r"\(warped.nii.gz, warped_labels.nii.gz, overview.png\).*--overwrite"):
        RunFolder(out, "register").prepare()
    with RunFolder(out, "register", overwrite=True) as folder:
        staging = folder.staging()
        (staging / "warped.nii.gz").write_text("new")
        (staging / "metrics.json").write_text("{}")
        assert {p.name: sha(p) for p in out.iterdir() if not p.name.startswith(".")} == before  # nothing yet
        final = folder.commit({"warped": staging / "warped.nii.gz", "metrics": staging / "metrics.json"})
    assert final == {"warped": out / "warped.nii.gz", "metrics": out / "metrics.json"}
    # the earlier run's leftovers are gone, the user's own file stays, no staging folder remains
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes-of-the-user.txt", "warped.nii.gz"]
    assert (out / "warped.nii.gz").read_text() == "new"


def test_failed_run_leaves_the_earlier_results_untouched(tmp_path):
    out = tmp_path / "out"
    _fill(out, ["warped.nii.gz", "metrics.json"])
    before = {p.name: sha(p) for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="computation failed"):
        with RunFolder(out, "register", overwrite=True) as folder:
            (folder.staging() / "warped.nii.gz").write_text("half")
            raise RuntimeError("computation failed")
    assert {p.name: sha(p) for p in out.iterdir()} == before


def test_other_commands_results_are_never_mixed(tmp_path):
    _fill(tmp_path, ["gvsl_final.pt", "history.json"])
    with pytest.raises(OutputFolderError, match=r"holds the results of a 'gvsl pretrain' run .*'gvsl register' "
                                                "does not write there"):
        RunFolder(tmp_path, "register", overwrite=True).prepare()


@pytest.mark.parametrize("names,expected", [
    (["gvsl_final.pt", "gvsl_last.pt", "history.json"], "a finished pre-training run .*--resume .*--overwrite"),
    (["gvsl_last.pt", "config.json"], "an unfinished pre-training run .*continue it with --resume"),
    (["config.json"], "files of an earlier pre-training run"),
])
def test_pretrain_into_an_earlier_run(tmp_path, names, expected):
    _fill(tmp_path, names)
    with pytest.raises(OutputFolderError, match=expected):
        RunFolder(tmp_path, "pretrain", lock=True).prepare()
    assert not (tmp_path / outputs.LOCK_NAME).exists()  # the refusal released the lock
    RunFolder(tmp_path, "pretrain", resume=True, lock=True).prepare().close(ok=True)
    with pytest.raises(UsageError, match="--resume .* --overwrite"):
        RunFolder(tmp_path, "pretrain", resume=True, overwrite=True)


def test_pretrain_overwrite_moves_aside_and_restores_on_failure(tmp_path):
    _fill(tmp_path, ["gvsl_final.pt", "gvsl_last.pt", "history.json"])
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    folder = RunFolder(tmp_path, "pretrain", overwrite=True, lock=True).prepare()
    assert not (tmp_path / "gvsl_final.pt").exists() and folder.replaced_names
    (tmp_path / "gvsl_last.pt").write_text("new run, step 1")
    with pytest.warns(UserWarning, match="the run failed, so the earlier run .* was put back"):
        folder.close(ok=False)  # the new run failed: the earlier run is back, exactly
    failed = [p for p in tmp_path.iterdir() if p.name.startswith("failed-run-")]
    assert len(failed) == 1 and (failed[0] / "gvsl_last.pt").read_text() == "new run, step 1"
    failed[0].joinpath("gvsl_last.pt").unlink()
    failed[0].rmdir()
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before
    folder = RunFolder(tmp_path, "pretrain", overwrite=True, lock=True).prepare()
    (tmp_path / "gvsl_last.pt").write_text("new")
    folder.close(ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gvsl_last.pt"]  # old final/history gone


_HOLD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from gvsl.outputs import FolderLock
lock = FolderLock(sys.argv[2], "pretrain").acquire()
print("LOCKED", flush=True)
time.sleep(60)
"""


def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT / "GVSLExtension"), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "LOCKED"
        with pytest.raises(FolderLockedError, match=rf"another gvsl pretrain \(PID {proc.pid}, started .*\) is "
                                                     rf"writing into .*: wait for it to finish, stop it \(kill {proc.pid}\)"):
            RunFolder(tmp_path, "pretrain", lock=True).prepare()
    finally:
        proc.kill()  # like kill -9: the lock file stays, naming a dead PID
        proc.wait()
    assert (tmp_path / outputs.LOCK_NAME).exists()
    lock = FolderLock(tmp_path, "pretrain").acquire()
    assert lock.took_over["pid"] == proc.pid
    lock.release()
    assert not (tmp_path / outputs.LOCK_NAME).exists()


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f"{outputs.STAGING_PREFIX}{dead}-abc123"
    stale.mkdir()
    (stale / "warped.nii.gz").write_text("half")
    RunFolder(tmp_path, "register").prepare().close(ok=True)
    assert list(tmp_path.iterdir()) == []


def test_result_names_cover_what_the_writers_write():
    """RESULTS must list every file write_outputs / the trainer writes (else leftovers survive)."""
    import inspect

    from gvsl import registration, train
    src = inspect.getsource(registration.write_outputs)
    for name in outputs.REGISTER_OUTPUTS:
        assert name in src, name
    import re
    written = set(re.findall(r'"([a-z_]+\.(?:nii\.gz|tfm|h5|json|png))"', src))
    assert written <= set(outputs.REGISTER_OUTPUTS), written - set(outputs.REGISTER_OUTPUTS)
    from gvsl import trainer
    tsrc = inspect.getsource(trainer)
    assert '(f"{task.prefix}_{s}.pt" for s in ("last", "final", "best"))' in tsrc
    for name in outputs.training_results("P")[3:]:
        assert f'"{name}"' in tsrc, name
    assert train.PretrainTask.prefix == "gvsl" and outputs.PRETRAIN_OUTPUTS[:2] == (train.FINAL, train.LAST)


def test_a_training_folder_is_not_mistaken_for_another_commands(tmp_path):
    """history.json / config.json are written by every training task: they say nothing."""
    _fill(tmp_path, ["seg_last.pt", "history.json", "config.json"])
    names = outputs.training_results("seg")
    RunFolder(tmp_path, "finetune", resume=True, lock=True, results=names).prepare().close(ok=True)
    with pytest.raises(OutputFolderError, match="an unfinished 'gvsl finetune' run .*--resume"):
        RunFolder(tmp_path, "finetune", lock=True, results=names).prepare()
    with pytest.raises(OutputFolderError, match="holds the results of a 'gvsl finetune' run"):
        RunFolder(tmp_path, "pretrain", lock=True).prepare()
