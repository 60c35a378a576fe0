"""The CPU profiles' dtype follows the processor: bfloat16 where it is native, float32 elsewhere."""
from __future__ import annotations

import logging
import platform

import pytest

from engine import profiles as engine_profiles
from engine.machine import CpuInfo, cpu_dtype, read_cpu
from engine.profiles import GiB, MiB, CheckpointRefused, fit_to_checkpoint, fit_to_cpu
from tests.test_checkpoint_profiles import shapes  # noqa: F401 - module fixture: real Gemma 4 shapes

ZEN3 = CpuInfo("x86_64", frozenset({"avx", "avx2", "fma"}))  # AVX2 only (the EPYC of issue 25)
ZEN4 = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}))
SAPPHIRE_RAPIDS = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}))
SKYLAKE_SP = CpuInfo("x86_64", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl"}))  # AVX-512, no BF16
GRAVITON3 = CpuInfo("aarch64", frozenset({"fp", "asimd", "sve", "bf16"}))
GRAVITON2 = CpuInfo("aarch64", frozenset({"fp", "asimd"}))


@pytest.mark.parametrize("cpu, dtype", [
    (ZEN3, "float32"), (ZEN4, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"), (SKYLAKE_SP, "float32"),
    (GRAVITON3, "bfloat16"), (GRAVITON2, "float32"), (CpuInfo("riscv64", frozenset({"bf16"})), "float32"),
])
def test_dtype_follows_native_bf16(cpu, dtype):
    assert cpu_dtype(cpu) == dtype


@pytest.mark.parametrize("cap, dtype", [
    ("AVX2", "float32"), ("avx512_core", "float32"), ("AVX512_CORE_VNNI", "float32"),
    ("AVX512_CORE_BF16", "bfloat16"), ("AVX512_CORE_AMX", "bfloat16"), (None, "bfloat16"),
])
def test_a_onednn_isa_cap_below_bf16_means_float32(cap, dtype):
    assert cpu_dtype(CpuInfo("x86_64", ZEN4.flags, cap)) == dtype


def test_cpuinfo_is_read_for_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm bf16 sve\n")
    assert "avx512_bf16" in read_cpu({}, str(x86)).flags
    assert "bf16" in read_cpu({"ONEDNN_MAX_CPU_ISA": "AVX2"}, str(arm)).flags
    assert read_cpu({"ONEDNN_MAX_CPU_ISA": "AVX2"}, str(arm)).onednn_max_isa == "AVX2"
    assert read_cpu({}, str(tmp_path / "missing")).flags == frozenset()  # unreadable: float32, the safe choice


@pytest.mark.skipif(platform.machine() != "x86_64", reason="torch's cpuinfo probe names x86 ISAs")
def test_this_machines_flags_agree_with_torchs_own_probe():
    import torch

    flags = read_cpu({}).flags
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_tile" in flags) == torch.cpu._is_amx_tile_supported()


def test_cpu_tiny_runs_float32_without_native_bf16_with_the_same_kv_tokens():
    profile = engine_profiles.PROFILES["cpu-tiny"]
    native, avx2 = fit_to_cpu(profile, cpu=ZEN4).engine_args, fit_to_cpu(profile, cpu=ZEN3).engine_args
    assert (native["dtype"], avx2["dtype"]) == ("bfloat16", "float32")
    assert avx2["kv_cache_memory_bytes"] == 2 * native["kv_cache_memory_bytes"] == 1024 * MiB


def test_bfloat16_asked_for_on_a_cpu_without_it_is_kept_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.profiles"):
        args = fit_to_cpu(engine_profiles.PROFILES["cpu-tiny"], "bfloat16", cpu=ZEN3).engine_args
    assert args["dtype"] == "bfloat16"
    [warning] = caplog.messages
    assert "no native bfloat16" in warning and "drop --engine_arg dtype=bfloat16" in warning


def test_accelerator_profiles_keep_their_dtype():
    for name, profile in engine_profiles.PROFILES.items():
        if profile.limits is None:  # TPU and GPU profiles
            assert fit_to_cpu(profile, cpu=ZEN3) is profile, name


def test_the_cpu_profile_sizes_memory_at_the_dtype_it_runs(shapes):  # noqa: F811
    native = fit_to_checkpoint(fit_to_cpu(engine_profiles.PROFILES["cpu"], cpu=ZEN4), shapes["E2B"], memory_bytes=32 * GiB)
    avx2 = fit_to_checkpoint(fit_to_cpu(engine_profiles.PROFILES["cpu"], cpu=ZEN3), shapes["E2B"], memory_bytes=32 * GiB)
    per_token = {name: args.engine_args["kv_cache_memory_bytes"] // args.engine_args["max_num_seqs"]
                 for name, args in (("bf16", native), ("fp32", avx2))}
    assert per_token["fp32"] == 2 * per_token["bf16"]  # KV follows the model's dtype ("auto")
    # float32 weights take twice the files' bf16 bytes: a checkpoint that fits in bf16 may not in fp32.
    with pytest.raises(CheckpointRefused, match=r"in float32.*--engine_arg dtype=bfloat16"):
        fit_to_checkpoint(fit_to_cpu(engine_profiles.PROFILES["cpu"], cpu=ZEN3), shapes["E4B"], memory_bytes=32 * GiB)
    fit_to_checkpoint(fit_to_cpu(engine_profiles.PROFILES["cpu"], cpu=ZEN4), shapes["E4B"], memory_bytes=32 * GiB)
