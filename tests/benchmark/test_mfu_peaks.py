"""The MFU denominator: a GPU's dense peak by its exact name, following the precision and train.tf32."""

from __future__ import annotations

import pytest
import torch

from trainer.benchmark.throughput import GPU_NAMES, GPU_PEAK_TFLOPS, GPU_ROWS, gpu_peak_tflops, peak_tflops


@pytest.mark.parametrize(
    "name, bf16",
    [
        ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA H800", 989.4), ("NVIDIA B200", 2250.0),
        ("NVIDIA H20", 148.0), ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ],
)  # fmt: skip
def test_each_gpu_gets_its_own_dense_bf16_peak(name, bf16):
    assert gpu_peak_tflops(name, "bf16", tf32=True)[1] == bf16


def test_nvl_parts_do_not_get_the_sxm_figure():
    assert gpu_peak_tflops("NVIDIA H100 NVL", "bf16", True) == ("H100 NVL bf16", 835.5)
    assert gpu_peak_tflops("NVIDIA H200 NVL", "bf16", True) == ("H200 NVL bf16", 835.5)
    assert gpu_peak_tflops("nvidia  h100-pcie", "bf16", True) == ("H100 PCIe bf16", 756.0)  # case, spaces, dashes


def test_fp32_peak_follows_train_tf32():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == ("H100 SXM tf32", 494.7)
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == ("H100 SXM fp32", 66.9)
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == ("A100 fp32", 19.5)
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == ("A100 bf16", 312.0)  # bf16: no TF32


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA H100 NVL 2", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-32GB",
                                  "NVIDIA GH200 480GB", ""])  # fmt: skip
def test_an_unknown_gpu_has_no_peak_rather_than_a_guess(name):
    assert gpu_peak_tflops(name, "bf16", True) is None


def test_the_table_is_consistent():
    assert len(GPU_ROWS) == len(GPU_NAMES)  # no two names collide once normalised
    assert set(GPU_NAMES.values()) <= set(GPU_PEAK_TFLOPS)
    for peaks in GPU_PEAK_TFLOPS.values():
        assert set(peaks) == {"bf16", "tf32", "fp32"} and peaks["bf16"] >= peaks["tf32"] > 0 and peaks["fp32"] > 0


def test_cpu_has_no_peak_unless_given():
    assert peak_tflops(torch.device("cpu"), "bf16", True, None) is None
    assert peak_tflops(torch.device("cpu"), "bf16", True, 123.0) == ("--peak_tflops", 123.0)
