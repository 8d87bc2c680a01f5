"""The README's one-way layering, as a contract: ``lint-imports`` with the contracts in setup.cfg.

Layers: core <- schemas <- detectors, synthetic <- pipeline, builders, trainer <- demo <- cli,
and no import cycles between the modules of any package.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_in_setup_cfg_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), str(ROOT / "setup.cfg"), "--no-cache"],
                            capture_output=True, text=True, cwd=ROOT)
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0
