"""Pre-training (Algorithm 1): losses go down, exact resume, DDP, signals, bad inputs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import io, phantoms
from gvsl.cli import main as gvsl_main
from gvsl.train import PretrainConfig, Pretrainer, TrainingError, crop_or_pad, pretrain, sample_pairs

TINY = [8, 16, 32, 64, 128, 64, 32, 16, 8]  # same architecture, fewer channels: fast CPU tests
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heart_volumes():
    """Six 40^3 CT heart phantoms, preprocessed with the ct preset (z, y, x) in [0, 1]."""
    vols = []
    for seed in range(6):
        image = phantoms.make_heart_phantom(size=40, seed=seed)[0]
        vols.append(sitk.GetArrayFromImage(io.preprocess(image, "ct", 1.0)).astype(np.float32))
    return vols


@pytest.fixture(scope="module")
def heart_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return [str(p) for p in phantoms.write_phantoms("heart", 3, 32, 0, out)]


def test_crop_or_pad_and_pairs_are_of_different_volumes():
    vol = np.arange(10 * 40 * 50, dtype=np.float32).reshape(10, 40, 50)
    block = crop_or_pad(vol, 32, torch.tensor([0.0, 1.0, 0.5]))
    assert block.shape == (32, 32, 32)
    np.testing.assert_array_equal(block[11:21, :, :], vol[:, 8:40, 9:41])  # z padded (centred), y at end
    assert block[:11].max() == 0 and block[21:].max() == 0
    vols = [np.full((20, 20, 20), float(i), np.float32) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = sample_pairs(vols, 2, 16, g)
        assert a.shape == (2, 1, 16, 16, 16)
        assert torch.all(a.amax(dim=(1, 2, 3, 4)) != b.amax(dim=(1, 2, 3, 4)))


def test_losses_go_down_on_phantoms(tmp_path, heart_volumes):
    # 40 steps of the tiny network, lr 1e-3, batch 2, 32^3 crops, full augmentation.
    cfg = PretrainConfig(images=[], out=str(tmp_path), steps=40, batch_size=2, crop=32, lr=1e-3, device="cpu",
                         seed=0, save_every=0, progress="none", model_channels=TINY)
    summary = pretrain(cfg, volumes=heart_volumes)
    hist = json.loads((tmp_path / "history.json").read_text())
    first = {k: np.mean(hist[k][:8]) for k in ("loss", "ncc", "mse")}
    last = {k: np.mean(hist[k][-8:]) for k in ("loss", "ncc", "mse")}
    # measured (seeded): loss 0.605 -> 0.544, NCC 0.560 -> 0.534, MSE 0.045 -> 0.010 (before the
    # ±5 % translation default and the published NCC: 0.843 -> 0.762, 0.795 -> 0.750, 0.044 -> 0.010).
    # margins asserted: total -5 %, NCC (registration) -3 %, restoration MSE -50 % (relative)
    assert last["loss"] < 0.95 * first["loss"], (first, last)
    assert last["mse"] < 0.5 * first["mse"], (first, last)
    assert last["ncc"] < 0.97 * first["ncc"], (first, last)
    assert summary["status"] == "done" and summary["step"] == 40
    assert (tmp_path / "gvsl_final.pt").exists() and (tmp_path / "loss_curve.png").exists()
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_equals_uninterrupted(tmp_path, heart_volumes):
    def cfg(out, steps, resume=False):
        return PretrainConfig(images=[], out=str(out), steps=steps, batch_size=2, crop=24, device="cpu", seed=5,
                              save_every=0, progress="none", model_channels=TINY, resume=resume)
    straight = Pretrainer(cfg(tmp_path / "a", 6), volumes=heart_volumes)
    straight.run()
    first = Pretrainer(cfg(tmp_path / "b", 3), volumes=heart_volumes)
    first.run()
    resumed = Pretrainer(cfg(tmp_path / "b", 6, resume=True), volumes=heart_volumes)
    assert resumed.step == 3
    resumed.run()
    assert resumed.history["loss"] == straight.history["loss"]  # bit-identical trajectory
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, heart_volumes):
    cfg = PretrainConfig(images=[], out=str(tmp_path), steps=2, crop=24, device="cpu", progress="none",
                         model_channels=TINY, resume=True)
    with pytest.raises(TrainingError, match="no gvsl_last.pt"):
        Pretrainer(cfg, volumes=heart_volumes)


def test_cli_pretrain_json_progress_and_checkpoint(tmp_path, heart_files, capsys):
    rc = gvsl_main(["pretrain", "--images", *heart_files, "--out", str(tmp_path / "run"), "--steps", "3",
                    "--batch-size", "1", "--crop", "32", "--device", "cpu", "--save-every", "2",
                    "--progress", "json"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"loss", "ncc", "smooth", "mse", "steps_per_s", "eta_s", "total"} <= set(r)
    assert any(r["event"] == "checkpoint" and r["step"] == 2 for r in records)
    assert records[-1]["event"] == "done"
    from gvsl.checkpoint import load_checkpoint
    ckpt = load_checkpoint(tmp_path / "run" / "gvsl_final.pt")
    assert ckpt["step"] == 3 and ckpt["preprocessing"]["preset"] == "ct"
    assert ckpt["train_config"]["crop"] == 32
    # the final checkpoint holds weights + metadata only: about a third of the resumable one
    assert "optimizer" not in ckpt and "rng" not in ckpt and "scaler" not in ckpt
    last = load_checkpoint(tmp_path / "run" / "gvsl_last.pt")
    assert "optimizer" in last and "rng" in last
    final_mb = (tmp_path / "run" / "gvsl_final.pt").stat().st_size / 2 ** 20
    last_mb = (tmp_path / "run" / "gvsl_last.pt").stat().st_size / 2 ** 20
    assert final_mb < 0.4 * last_mb, (final_mb, last_mb)  # measured at full width: ~130 MB vs ~390 MB
    # the preprocessed volumes are cached for the next run
    assert list((tmp_path / "run" / "cache").glob("*.npy"))


@pytest.mark.parametrize("case", ["empty", "single"])
def test_cli_bad_inputs_give_one_clear_line(tmp_path, heart_files, capsys, case):
    if case == "empty":
        (tmp_path / "empty").mkdir()
        images, expected = [str(tmp_path / "empty")], "no volumes found"
    else:
        images, expected = heart_files[:1], "at least two volumes"
    rc = gvsl_main(["pretrain", "--images", *images, "--out", str(tmp_path / "o"), "--steps", "1",
                    "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, heart_files):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gvsl", "pretrain", "--images", *heart_files, "--out", str(out), "--steps",
           "1000", "--batch-size", "1", "--crop", "32", "--device", "cpu", "--progress", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "step":
                break
        proc.send_signal(signal.SIGINT)
        out_rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    events = [json.loads(x) for x in out_rest.splitlines() if x.startswith("{")]
    assert events[-1]["event"] == "cancelled" and events[-1]["stopped_by"] == "SIGINT"
    from gvsl.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out / "gvsl_last.pt")
    assert ckpt["step"] >= 1 and "optimizer" in ckpt
    assert not (out / "gvsl_final.pt").exists()


def test_torchrun_gloo_two_ranks_hold_identical_weights(tmp_path, heart_files):
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "GVSLExtension"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "Testing" / "ddp_worker.py"), str(out), *heart_files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2 and r0["backend"] == "gloo"
    assert r0["step"] == r1["step"] == 2
    assert r0["sha256"] == r1["sha256"]
    assert r0["losses"] == r1["losses"]  # logged losses are the mean over ranks, the same everywhere
    # rank 0 preprocessed and cached the 3 volumes before rank 1 started, which read the cache
    assert r0["npy_before_load"] == 0 and r1["npy_before_load"] == 3
    # only rank 0 writes checkpoints, and the resumable checkpoint records both ranks' data streams
    # (gvsl_final.pt holds weights + metadata only since issue 8)
    from gvsl.checkpoint import load_checkpoint
    ckpt = load_checkpoint(out / "gvsl_last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]["generators"]) == 2
    assert load_checkpoint(out / "gvsl_final.pt")["world_size"] == 2


def _torchrun(out, heart_files, mode, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "GVSLExtension"), GVSL_TEST_MODE=mode)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "Testing" / "ddp_worker.py"), str(out), *heart_files]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_gloo_a_non_finite_loss_on_one_rank_stops_both(tmp_path, heart_files):
    out = tmp_path / "ddp_nan"
    out.mkdir()
    proc = _torchrun(out, heart_files, "nan", timeout=300)  # a hang would end here as TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    # both ranks stopped at the same step with the same collective message naming the rank
    assert r0["step"] == r1["step"] == 1
    assert r0["error"] == r1["error"] and r0["collective"] and r1["collective"]
    assert "the loss became nan at step 2 on rank 1 of 2" in r0["error"]
    assert "--lr" in r0["error"] and "--resume" in r0["error"]
    assert r0["sha256"] == r1["sha256"]  # nobody took the bad step


def test_resume_takes_the_settings_from_the_checkpoint_and_refuses_a_changed_crop(tmp_path, heart_files, capsys):
    out = tmp_path / "run"
    pretrain(PretrainConfig(images=heart_files, out=str(out), steps=2, batch_size=1, crop=32, device="cpu",
                            save_every=1, progress="none", model_channels=TINY))
    base = ["pretrain", "--images", *heart_files, "--out", str(out), "--device", "cpu", "--resume"]
    rc = gvsl_main(base + ["--crop", "24", "--steps", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--crop was 32 in the interrupted run, now 24" in err and "drop --crop" in err
    # the same command without --crop continues with the checkpoint's settings (crop 32, tiny network)
    rc = gvsl_main(base + ["--steps", "3", "--progress", "json"])
    assert rc == 0, capsys.readouterr().err
    from gvsl.checkpoint import load_checkpoint
    final = load_checkpoint(out / "gvsl_final.pt")
    assert final["step"] == 3 and final["train_config"]["crop"] == 32
    assert final["model_config"]["channels"] == TINY


def test_resume_into_a_different_network_width_is_one_clear_error(tmp_path, heart_volumes):
    def cfg(**kw):
        return PretrainConfig(images=[], out=str(tmp_path), batch_size=1, crop=24, device="cpu",
                              save_every=0, progress="none", **kw)
    pretrain(cfg(model_channels=TINY, steps=2), volumes=heart_volumes)
    other = [16, 32, 64, 128, 256, 128, 64, 32, 16]
    with pytest.raises(TrainingError, match=r"model_channels \(network width\) was"):
        Pretrainer(cfg(model_channels=other, resume=True, steps=4), volumes=heart_volumes)
    # a gvsl_last.pt whose weights are of another width than its settings say
    from gvsl.network import GVSL, ModelConfig
    last = tmp_path / "gvsl_last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state_dict"] = GVSL(ModelConfig(channels=tuple(other))).state_dict()
    torch.save(ckpt, last)
    with pytest.raises(TrainingError, match="different network"):
        Pretrainer(cfg(model_channels=TINY, resume=True, steps=4), volumes=heart_volumes)


def test_resume_with_a_new_lr_uses_it_and_says_so(tmp_path, heart_volumes):
    def cfg(**kw):
        return PretrainConfig(images=[], out=str(tmp_path), batch_size=1, crop=24, device="cpu", save_every=0,
                              progress="none", model_channels=TINY, **kw)
    pretrain(cfg(steps=1), volumes=heart_volumes)
    records = []
    trainer = Pretrainer(cfg(steps=2, lr=3e-5, resume=True), callback=records.append, volumes=heart_volumes)
    assert trainer.config.lr == 3e-5 and all(g["lr"] == 3e-5 for g in trainer.optimizer.param_groups)
    assert any(r["event"] == "warning" and "--lr" in r["message"] for r in records)
    trainer.run()
    assert trainer.step == 2


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--crop", "8"),
                                           ("--crop", "100000"), ("--steps", "0"), ("--batch-size", "0"),
                                           ("--save-every", "-2"), ("--spacing", "nan"), ("--spacing", "0")])
def test_cli_bad_settings_name_the_option(tmp_path, heart_files, capsys, option, value):
    rc = gvsl_main(["pretrain", "--images", *heart_files, "--out", str(tmp_path / "o"), "--device", "cpu",
                    option, value])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"error: {option} must be" in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written
