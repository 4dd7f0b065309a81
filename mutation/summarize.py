"""Per-module killed/total of the last `mutmut run` (read from mutants/**/*.meta), and the survivors.

Usage: python mutation/summarize.py [--json OUT] — run from the project root after mutation/run.sh.
Only the mutants named by mutation/targets.txt count. Killed includes timeouts (mutmut's own score).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]


def targets() -> list[str]:
    lines = (ROOT / "mutation" / "targets.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def module_of(mutant: str) -> str:
    head = mutant.split("__mutmut_")[0]
    for marker in (".x_", ".xǁ"):
        if marker in head:
            return head.split(marker)[0]
    return head.rpartition(".")[0]


def collect() -> tuple[dict[str, Counter], dict[str, list[str]]]:
    globs = targets()
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for meta in sorted((ROOT / "mutants").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            if not any(fnmatch.fnmatch(name, g) for g in globs):
                continue
            status = status_by_exit_code[code]
            module = module_of(name)
            counts[module]["total"] += 1
            counts[module][status] += 1
            if status == "survived":
                survivors[module].append(name)
    return counts, survivors


def main() -> int:
    counts, survivors = collect()
    if not counts:
        print("no mutant results under mutants/: run mutation/run.sh first", file=sys.stderr)
        return 1
    rows = []
    header = (
        f"{'module':28} {'mutants':>7} {'checked':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'other':>5} {'score':>7}"
    )
    print(header)
    print("-" * len(header))
    for module, c in sorted(counts.items()):
        killed = c["killed"] + c["timeout"]
        checked = c["total"] - c["not checked"] - c["skipped"]
        other = checked - killed - c["survived"] - c["no tests"]
        score = 100.0 * killed / checked if checked else 0.0  # mutmut's score: killed (timeouts too) / tested
        rows.append(
            {
                "module": module,
                "mutants": c["total"],
                "checked": checked,
                "killed": killed,
                "survived": c["survived"],
                "no_tests": c["no tests"],
                "other": other,
                "score": round(score, 1),
                "statuses": dict(c),
            }
        )
        print(f"{module:28} {c['total']:7} {checked:7} {killed:6} {c['survived']:8} {c['no tests']:8} {other:5} {score:6.1f}%")
    if any(r["checked"] < r["mutants"] for r in rows):
        print("(partial: a run still going, or stopped; score = killed / checked)")
    print("\nsurvivors (mutmut show <name> for the diff):")
    for module in sorted(survivors):
        for name in survivors[module]:
            print(f"  {name}")
    if "--json" in sys.argv:
        out = Path(sys.argv[sys.argv.index("--json") + 1])
        out.write_text(json.dumps({"modules": rows, "survivors": survivors}, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
