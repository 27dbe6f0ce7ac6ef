"""The gvsl command's basics and device/precision selection (CPU-only machine)."""
import json
import subprocess
import sys

import pytest
import torch

import gvsl
from gvsl.cli import main as gvsl_main
from gvsl.device import DeviceError, Precision, choose_precision, select_device


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "gvsl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"gvsl {gvsl.__version__}"
    out = subprocess.run([sys.executable, "-m", "gvsl", "--help"], capture_output=True, text=True)
    for cmd in ("pretrain", "register", "phantom", "demo", "info"):
        assert cmd in out.stdout


def test_public_api_names():
    from gvsl.registration import register
    assert gvsl.register is register and callable(gvsl.register)
    assert gvsl.load_model.__module__ == "gvsl.checkpoint"


def test_info_reports_device_and_precision(capsys):
    assert gvsl_main(["info", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"].startswith("cpu") and info["training_precision"] == "fp32"
    assert info["inference_precision"] == "fp32"  # bf16 on the CPU only when asked (test_network)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_unavailable_cuda_is_a_clear_error(capsys):
    with pytest.raises(DeviceError, match="sees no CUDA GPU.*--device cpu"):
        select_device("cuda")
    assert gvsl_main(["info", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_device_choices():
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    assert select_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        select_device("tpu")


def test_precision_rules_on_cpu():
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "training").dtype is None  # CPU training is fp32
    inference = choose_precision(cpu, "inference")
    assert inference.dtype is None and inference.channels_last  # fp32 channels-last, AMX or not
    assert choose_precision(cpu, "inference", "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 autocast is not supported on the CPU"):
        choose_precision(cpu, "inference", "fp16")
    p = Precision(cpu, None, channels_last=True)
    x = p.prepare_input(torch.rand(1, 1, 4, 4, 4))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
