"""Write requirements-gpu.lock: the exact CUDA wheels (nvidia-*) that the `gpu` extra pulls in, for
the TensorFlow pinned in requirements.lock. pip resolves them without downloading the wheels (their
metadata is enough), so this runs anywhere PyPI is reachable, GPU or not.

    python tools/lock_gpu.py            # what `make lock` runs after refreshing requirements.lock
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# The CUDA wheels of the `gpu` extra (tensorflow[and-cuda]), pinned for the TensorFlow of
# requirements.lock; written by `python tools/lock_gpu.py` (`make lock`). On a GPU node:
#   pip install -c requirements.lock -c requirements-gpu.lock -e '.[gpu]'   (= make setup-gpu)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
        subprocess.run([*pip, "--report", str(report), "-c", str(ROOT / "requirements.lock"), f"{ROOT}[gpu]"], check=True)
        chosen = [item["metadata"] for item in json.loads(report.read_text())["install"]]
    pins = sorted(f"{m['name'].lower()}=={m['version']}" for m in chosen if m["name"].lower().startswith("nvidia-"))
    if not pins:
        raise SystemExit("the gpu extra resolved to no nvidia-* wheel: is it still tensorflow[and-cuda]?")
    (ROOT / "requirements-gpu.lock").write_text(HEADER + "\n".join(pins) + "\n")
    print(f"requirements-gpu.lock: {len(pins)} CUDA wheels")


if __name__ == "__main__":
    main()
