"""gvsl_slicer.jobs.Job against real child processes (the real `gvsl pretrain`, and stand-ins
for a crash and for a child that ignores Cancel)."""
import os
import signal
import sys
import textwrap
import time

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_slicer.jobs import Job, job_environment

TINY = ["--model-channels", "8", "8", "16", "16", "32", "16", "16", "8", "8"]


def write_volumes(folder, n=3, size=24):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    paths = []
    for i in range(n):
        c = size / 2 + rng.uniform(-2, 2, 3)
        blob = np.exp(-(((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * (size / 5) ** 2)))
        arr = (-1000 + 1400 * blob + rng.normal(0, 20, blob.shape)).astype(np.float32)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.5, 1.5, 1.5))
        paths.append(folder / f"vol{i}.nii.gz")
        sitk.WriteImage(img, str(paths[-1]))
    return paths


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pretrain_args(images, out, steps):
    return ["pretrain", "--images", str(images), "--out", str(out), "--steps", str(steps), "--crop", "16",
            "--batch-size", "1", "--save-every", "1", "--device", "cpu", "--spacing", "3", *TINY]


@pytest.mark.slow
def test_pretrain_job_progress_and_cancel_keeps_a_resumable_checkpoint(tmp_path):
    import torch

    from gvsl.checkpoint import load_checkpoint
    images = tmp_path / "images"
    write_volumes(images)
    out = tmp_path / "run"
    steps = []
    job = Job(pretrain_args(images, out, 400), on_event=lambda r: steps.append(r) if r["event"] == "step" else None,
              grace_s=60)
    job.start()
    t0 = time.monotonic()
    while job.poll() == "running" and len(steps) < 3:
        assert time.monotonic() - t0 < 120, list(job.log)
        time.sleep(0.05)
    assert [r["step"] for r in steps[:3]] == [1, 2, 3]
    assert {"loss", "ncc", "smooth", "mse", "eta_s", "total"} <= set(steps[0])
    job.cancel()
    t_cancel = time.monotonic()
    assert job.wait(timeout=120) == "cancelled", (job.error, list(job.log))
    assert time.monotonic() - t_cancel < 30  # stopped after the current step, no kill needed
    assert not job._killed
    assert not group_alive(job.pid)
    stopped_at = job.result["step"]
    assert 3 <= stopped_at < 400
    ckpt = load_checkpoint(out / "gvsl_last.pt")
    assert ckpt["step"] == stopped_at and "optimizer" in ckpt
    assert not (out / "gvsl_final.pt").exists()

    assert "rng" in ckpt and ckpt["history"]["step"][-1] == stopped_at  # resumable (resume: test_mrml_pretraining)
    assert torch.isfinite(torch.tensor(ckpt["history"]["loss"])).all()


def test_crashing_child_gives_clear_message(tmp_path):
    crash = textwrap.dedent("""
        import json, sys
        print(json.dumps({"event": "step", "step": 1, "total": 5}), flush=True)
        raise MemoryError("simulated out of memory in the child")
    """)
    job = Job(["pretrain"], command=[sys.executable, "-c", crash], env=job_environment())
    assert job.start().wait(timeout=60) == "failed"
    assert job.last_step["step"] == 1
    assert "exit code 1" in job.error and "MemoryError: simulated out of memory" in job.error
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        job.raise_for_state()


def test_user_error_of_the_engine_is_the_message(tmp_path):
    job = Job(["pretrain", "--images", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o"),
               "--device", "cpu"])
    assert job.start().wait(timeout=120) == "failed"
    assert "nothing-here" in job.error and "Traceback" not in job.error


def test_child_ignoring_cancel_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    stubborn = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print('{{"event": "start"}}', flush=True)
        while True:
            time.sleep(0.1)
    """)
    job = Job(["register"], command=[sys.executable, "-c", stubborn], env=job_environment(), grace_s=0.5)
    job.start()
    while not job.events:
        job.poll()
        time.sleep(0.05)
    job.cancel()
    t0 = time.monotonic()
    assert job.wait(timeout=30) == "cancelled"
    assert time.monotonic() - t0 < 5
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the grandchild survived the kill of the process tree")
    assert not group_alive(job.pid)
