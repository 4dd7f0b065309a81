"""What decided a run's numerics, recorded in its run info, its summary and the model card, and
compared by `cifarflow compare-runs` and `verify-repro`: the CPU (vendor, generation, the ISA
flags some library dispatches on, the caches Eigen sizes its blocks by), the threads, the mode
and environment (cifarflow.portable), oneDNN and XLA's target, the library versions and
TensorFlow's build, the GPUs. Deterministic for a host: no host name, no time, no device index.

Every probe degrades to None rather than fail a run: a record with a hole beats no weights.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from cifarflow.portable import NUMERIC_ENV

# /proc/cpuinfo spelling. sse4a marks AMD, on which XLA's rsqrt takes one Newton step (two on Intel).
ISA_FLAGS = (
    "sse4_2", "avx", "f16c", "fma", "avx2", "sse4a",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)  # fmt: skip
XLA_ISAS = ("SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16")  # XLA 2.21's list


def _quietly(probe: Any, *args: Any) -> Any:
    try:
        return probe(*args)
    except Exception:  # a record with a hole beats a failed run
        return None


def _cpuinfo() -> dict[str, Any]:
    block = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n", 1)[0]  # the first processor
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id"),
        "model_name": fields.get("model name"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "stepping": fields.get("stepping"),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
    }


def _caches() -> dict[str, str] | None:
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
        sizes[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = (index / "size").read_text().strip()
    return sizes or None


def usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def host() -> dict[str, Any]:
    """The CPU and what can be used of it; cheap (no numpy, no TensorFlow)."""
    cpu = _quietly(_cpuinfo) if Path("/proc/cpuinfo").is_file() else None
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu": cpu or {"model_name": platform.processor() or None},
        "caches": _quietly(_caches),
        "cpus_usable": usable_cpus(),
    }


def xla_target(isa: list[str], xla_flags: str | None) -> dict[str, Any]:
    """What XLA:CPU compiles for (it has no query: derived from its flags and the host, as its source does)."""
    caps = re.findall(r"--xla_cpu_max_isa=(\S+)", xla_flags or "")
    cap = caps[-1].upper() if caps else None  # the last one wins; XLA upper-cases it
    avx = "avx" in isa and cap != "SSE4_2"
    return {
        "max_isa": cap if cap is None or cap in XLA_ISAS else f"{cap} (unknown to XLA: no cap)",
        "fma_contraction": "fma" in isa and cap not in ("SSE4_2", "AVX"),
        "rsqrt": "1/sqrt" if not avx else ("hardware, 1 Newton step (AMD)" if "sse4a" in isa else "hardware, 2 Newton steps"),
    }


def _tensorflow() -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    try:  # private, but the only query; it reads TF_ENABLE_ONEDNN_OPTS once, as the kernels do
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = None
    build = _quietly(tf.sysconfig.get_build_info) or {}
    details = [(d, _quietly(tf.config.experimental.get_device_details, d) or {}) for d in tf.config.list_physical_devices("GPU")]
    gpus = [
        {"name": info.get("device_name", d.device_type), "compute_capability": info.get("compute_capability")}
        for d, info in details
    ]
    return {
        "onednn": onednn,
        "gpus": gpus,
        "gpu_driver": _quietly(lambda: Path("/proc/driver/nvidia/version").read_text().splitlines()[0]) if gpus else None,
        "versions": {
            # major.minor: a patch release changes no arithmetic, and a container's Python differs
            # from the host's in the patch level alone (3.11.2 vs 3.11.7 gave the same weights).
            "python": ".".join(platform.python_version_tuple()[:2]),
            "tensorflow": tf.__version__,
            "tensorflow_git": tf.version.GIT_VERSION,
            "tensorflow_compiler": tf.version.COMPILER_VERSION,
            "tensorflow_build": {k: build[k] for k in sorted(build) if k.startswith(("cpu_", "cuda", "cudnn", "is_"))},
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
    }


def record(portable: bool) -> dict[str, Any]:
    """The whole record for a run in this process (TensorFlow loaded: call it from the trainer)."""
    here = host()
    isa = (here["cpu"] or {}).get("isa") or []
    env = {name: os.environ[name] for name in NUMERIC_ENV if name in os.environ}
    threads = env.get("TF_NUM_INTRAOP_THREADS")
    return {
        "mode": "portable" if portable else "native",
        **here,
        "intra_op_threads": int(threads) if threads and threads.isdigit() else here["cpus_usable"],
        "environment": env,
        "xla": xla_target(isa, env.get("XLA_FLAGS")),
        **(_quietly(_tensorflow) or {}),
    }


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """What differs between two records, one `field: a != b` each; [] when the hosts are comparable.
    A portable pair compares only what portable mode cannot pin (the mode, the threads, the versions
    and build, the caches: Eigen's GEMM blocks follow the L1/L2 sizes, and no setting fixes them)."""
    if not a or not b:
        return ["no numerics record" + (" in the first run" if not a else " in the second run")]
    # the CPUs usable only decide numerics through the thread count, which is compared itself
    left, right = ({k: v for k, v in _flat(r).items() if k != "cpus_usable"} for r in (a, b))
    if a.get("mode") == b.get("mode") == "portable":
        keep = ("mode", "intra_op_threads", "environment.", "versions.", "caches.", "gpus", "machine")
        left = {k: v for k, v in left.items() if k.startswith(keep)}
        right = {k: v for k, v in right.items() if k.startswith(keep)}
    return [f"{k}: {left.get(k)} != {right.get(k)}" for k in sorted(left.keys() | right.keys()) if left.get(k) != right.get(k)]


def describe(numerics: dict[str, Any] | None) -> str:
    """One line for a person: the CPU, its widest vector ISA, the mode and threads."""
    if not numerics:
        return "unknown host"
    cpu = numerics.get("cpu") or {}
    isa = cpu.get("isa") or []
    widest = next((f for f in ("amx_tile", "avx512f", "avx2", "avx", "sse4_2") if f in isa), "no x86 SIMD")
    return (
        f"{cpu.get('vendor') or ''} {cpu.get('model_name') or numerics.get('machine')} "
        f"(family {cpu.get('family')} model {cpu.get('model')}, {widest.upper()}), "
        f"{numerics.get('mode')} mode, {numerics.get('intra_op_threads')} threads, "
        f"oneDNN {'on' if numerics.get('onednn') else 'off'}"
    ).strip()
