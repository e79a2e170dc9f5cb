"""STYLE rule 4: the host-side modules never import jax (checked in a fresh interpreter)."""

import subprocess
import sys
from pathlib import Path

HOST_MODULES = ["jaxpaged.sequence", "jaxpaged.block_manager", "jaxpaged.scheduler", "jaxpaged.buckets"]


def test_host_modules_do_not_import_jax():
    code = (
        "import importlib, sys\n"
        f"for name in {HOST_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
        "print(','.join(leaked))\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"host modules imported: {result.stdout.strip()}"
