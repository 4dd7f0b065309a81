"""The numeric environment of a run: what params (`runtime.portable`, `runtime.threads`) set in the
process environment before numpy and TensorFlow load, because those libraries read it only then.

Native mode (the default) leaves the host's own choices: on an AVX-512 host TensorFlow turns oneDNN
on and XLA compiles for AVX-512, so the same params give the same weights on the same kind of host.
Portable mode pins everything found to vary with the host (measured on TF 2.21; see the README's
"The same bytes on every machine"), so the same params give the same weights on any x86-64 host
with AVX2 and FMA, Intel or AMD, whatever its core count:

- TensorFlow's oneDNN kernels off (on by default only on hosts with AVX512_VNNI/BF16, AVX_VNNI, AMX);
- oneDNN's sgemm, which TensorFlow's Eigen contractions and XLA's convolutions call even with
  oneDNN off, capped at AVX2;
- XLA's code generation capped at SSE4_2: the only cap that removes both FMA contraction and the
  vendor-specific hardware rsqrt (one Newton step on AMD, two on Intel) that BatchNorm uses;
- XLA's library fusions (YNNPACK, XNNPACK, oneDNN) off: they pick kernels from the host's CPU
  whatever the ISA cap says;
- the intra-op thread count fixed (Eigen and XLA split work by it, and the split changes sums);
- numpy's OpenBLAS core fixed to Haswell and numpy's dispatch capped at AVX2 (the whitening kernel's
  covariance and eigendecomposition).
"""

from __future__ import annotations

import os
import sys

from cifarflow.errors import ConfigError

# read once, when the library loads: after that, setting them changes nothing
LOADS_NUMERICS = ("numpy", "tensorflow", "keras")
# inherited from a caller's shell, these would make a portable run's numerics the host's again
NOT_PORTABLE = (
    "TF_SET_ONEDNN_FPMATH_MODE",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "DNNL_DEFAULT_FPMATH_MODE",
    "DNNL_MAX_CPU_ISA",
    "NPY_ENABLE_CPU_FEATURES",
    "TENSORFLOW_USE_CUSTOM_CONTRACTION_KERNEL",
    "TF_XLA_FLAGS",
)
XLA_CAP = "--xla_cpu_max_isa=SSE4_2"
XLA_NO_LIBRARY_FUSIONS = (
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_xnn_fusion_type=",
    "--xla_cpu_experimental_onednn_fusion_type=",
)
PORTABLE = {
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",  # needs AVX2 and FMA: a core the CPU lacks kills numpy's import (SIGILL)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy 2.4's dispatch groups above AVX2
}
# every variable that changes a run's numbers: what portable mode sets, and what it removes
NUMERIC_ENV = (*PORTABLE, "TF_NUM_INTRAOP_THREADS", "XLA_FLAGS", *NOT_PORTABLE)
NEEDS = ("avx2", "fma")  # /proc/cpuinfo flags portable mode's kernels run on


def cpu_flags() -> set[str] | None:
    """The first processor's /proc/cpuinfo flags; None where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def environment(portable: bool, threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment a run with these settings needs, from `base` (default: this one's)."""
    env = dict(os.environ if base is None else base)
    if threads:
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
    if not portable:
        return env
    flags = cpu_flags()
    missing = [flag for flag in NEEDS if flags is not None and flag not in flags]
    if flags is None or missing:
        raise ConfigError(
            "runtime.portable: true needs an x86-64 host with AVX2 and FMA; this host "
            + (f"lacks {', '.join(missing)} (/proc/cpuinfo flags)" if flags is not None else "has no /proc/cpuinfo")
            + ". Set runtime.portable: false (native mode: the same bytes on the same kind of host)."
        )
    for name in NOT_PORTABLE:
        env.pop(name, None)
    kept = [a for a in env.get("XLA_FLAGS", "").split() if not a.startswith(("--xla_cpu_max_isa=", "--xla_cpu_experimental_"))]
    env["XLA_FLAGS"] = " ".join([*kept, XLA_CAP, *XLA_NO_LIBRARY_FUSIONS])
    env.update(PORTABLE)
    return env


def apply(portable: bool, threads: int) -> None:
    """Make this process's environment the one the settings need. Only before numpy or TensorFlow
    has loaded: every `cifarflow` command loads params first, so DVC's and Prefect's stages qualify."""
    wanted = environment(portable, threads)
    changed = sorted(k for k in wanted.keys() | os.environ.keys() if wanted.get(k) != os.environ.get(k))
    if not changed:
        return
    loaded = [name for name in LOADS_NUMERICS if name in sys.modules]
    if loaded:
        raise ConfigError(
            f"runtime.portable/runtime.threads set {', '.join(changed)}, which {', '.join(loaded)} reads only when "
            "it loads, and it is loaded already: run `cifarflow` as its own process (as DVC and Prefect do)"
        )
    os.environ.clear()
    os.environ.update(wanted)
