"""`make bench`: run every benchmark script in this folder, one after another (they time
themselves, so nothing else should run on the machine meanwhile)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# Analysis tools that read a run you name, not benchmarks that build their own.
TOOLS = {"run_all.py", "reward_errors.py"}


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("*.py")):
        if script.name in TOOLS:
            continue
        print(f"\n## {script.stem}\n", flush=True)
        if subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
