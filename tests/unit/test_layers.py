"""The package has no import cycles, not even through imports inside functions.

A function-level import that closes a cycle hides a layering mistake; the contract in
pyproject.toml ([tool.importlinter]) checks every level of the tree, from the top-level
modules and packages down to the modules of each sub-package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_import_cycles_at_any_depth() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
