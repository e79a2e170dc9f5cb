"""Shared fixtures: the embedded SmolLM2 in jaxpaged and in transformers (the reference)."""

import os

import pytest

# Tests run on the CPU in f32 unless a GPU test asks otherwise; keep XLA quiet and single-host.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# f32 matmuls at full precision: on an H100 (JAX_PLATFORMS=cuda) the default is TF32, whose
# ~2e-4 relative error fails the f32 tolerances of the kernel tests in both the kernels and
# their references. On the CPU this changes nothing.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Four CPU devices for the tensor-parallel tests (read once, when jax first starts, so before
# any test module imports it); every other test keeps running on device 0 alone.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> str:
    """A fresh weight cache for the session, so the convert-then-cache path is exercised; under
    pytest's temporary root, which keeps only the last few sessions' (~340 MB each)."""
    root = str(tmp_path_factory.mktemp("jaxpaged-cache"))
    os.environ["JAXPAGED_CACHE_DIR"] = root
    return root


@pytest.fixture(scope="session")
def smollm2(cache_root):
    from jaxpaged.loader import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2():
    import torch
    import transformers

    from jaxpaged.loader import default_model_path

    # torch's threads fight XLA's for the same cores; one thread is faster here overall.
    torch.set_num_threads(1)

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's caches of compiled programs. One pytest process
    otherwise keeps every XLA executable the suite compiles (module-level jitted functions
    cache them for good), each holding a few memory mappings: the serial suite reached the
    kernel's limit of 65,530 mappings per process and a late XLA compile segfaulted."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
