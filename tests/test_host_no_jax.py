"""STYLE rule 4: the host-side modules never import jax (checked in fresh interpreters)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = ["jaxpaged.sequence", "jaxpaged.block_manager", "jaxpaged.scheduler", "jaxpaged.buckets",
                "jaxpaged.input_batch"]

_REPORT_JAX = (
    "import importlib, sys\n"
    f"for name in {HOST_MODULES!r}:\n"
    "    importlib.import_module(name)\n"
    "print(','.join(sorted(m for m in sys.modules if m in ('jax', 'jaxlib'))))\n"
)
# An empty stand-in for the package, so that only the host modules' own imports run.
_STUB_PACKAGE = (
    "import sys, types\n"
    "package = types.ModuleType('jaxpaged')\n"
    f"package.__path__ = [{str(ROOT / 'jaxpaged')!r}]\n"
    "sys.modules['jaxpaged'] = package\n"
)


def _jax_modules_after(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_host_modules_do_not_import_jax():
    leaked = _jax_modules_after(_STUB_PACKAGE + _REPORT_JAX)
    assert leaked == "", f"a host module imports {leaked}"


def test_package_import_keeps_host_modules_jax_free():
    leaked = _jax_modules_after(_REPORT_JAX)
    assert leaked == "", (
        f"`import jaxpaged.scheduler` imports {leaked} through jaxpaged/__init__.py: make the "
        "package's re-exports (LLM, LLMEngine, ...) lazy with a module __getattr__ (PEP 562)"
    )
