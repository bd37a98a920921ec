"""bench/gpu_check.py, the GPU pre-flight, as far as a CPU runs it: its harness (the paper runs
taken from run_all.sh, each check one PASS/FAIL/SKIP line, the record), the checks that run on
a CPU, and the decoder comparison with the CPU standing in for the GPU."""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_on_a_cpu_runs_what_it_can_and_names_what_it_skips(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "dry-run lenet5",
                           "deterministic lenet5", "amp", "host-syncs", "torchrun"])
    said = capsys.readouterr().out
    record = json.load(open(tmp_path / "gpu_check.json"))
    lines = {l["check"]: l for l in record["checks"]}
    assert code == 0 and record["gpus"] == 0 and record["device"] == "the CPU"
    assert lines["dry-run lenet5"]["status"] == "PASS"
    assert lines["deterministic lenet5"]["status"] == "PASS"
    assert json.load(open(tmp_path / "runs" / "lenet5" / "results.json"))["data"] == "mnist"
    assert {k for k, l in lines.items() if l["status"] == "SKIP"} >= {
        "amp resnet-20", "host-syncs lenet5", "torchrun nccl-2 = one process"}
    assert all(l["detail"] == "needs a CUDA GPU" for l in lines.values() if l["status"] == "SKIP")
    assert "SKIP amp fcn-32s: needs a CUDA GPU" in said


def test_the_decoder_comparison_passes_on_equal_pixels_and_fails_on_different_ones(tmp_path,
                                                                                 monkeypatch):
    said = gpu_check.check_decoders(torch.device("cpu"), str(tmp_path))
    for kind in ("rgb", "grey", "cmyk", "progressive", "png-named-jpg"):
        assert f"{kind} 0.00/0" in said
    real = gpu_check.data.DecodeOnDevice.decode
    monkeypatch.setattr(gpu_check.data.DecodeOnDevice, "decode",
                        lambda self, files: [x // 2 for x in real(self, files)])
    try:
        gpu_check.check_decoders(torch.device("cpu"), str(tmp_path))
    except RuntimeError as e:
        assert "mean difference" in str(e)
    else:
        raise AssertionError("halved pixels passed the comparison")


def test_an_only_that_names_no_check_is_a_one_line_error(tmp_path):
    import pytest
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--only", "dry-run lenet6"])
    assert str(e.value).startswith("gpu_check.py: error: no check's name starts with dry-run "
                                   "lenet6")
