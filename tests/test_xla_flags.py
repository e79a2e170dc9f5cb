import pytest

from jaxpaged.xla_flags import DEFAULT_XLA_FLAGS, apply_default_xla_flags


def test_adds_the_defaults_to_what_is_set():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    added = apply_default_xla_flags(env)
    assert added == [f"--{k}={v}" for k, v in DEFAULT_XLA_FLAGS.items()]
    assert env["XLA_FLAGS"] == " ".join(["--xla_dump_to=/tmp/x", *added])
    assert apply_default_xla_flags(env) == []  # idempotent


def test_leaves_a_flag_the_user_set_and_can_be_turned_off():
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    assert apply_default_xla_flags(env) == ["--xla_gpu_enable_dynamic_slice_fusion=true"]
    assert "--xla_gpu_enable_triton_gemm=true" in env["XLA_FLAGS"]
    assert "--xla_gpu_enable_triton_gemm=false" not in env["XLA_FLAGS"]
    env = {"JAXPAGED_XLA_FLAGS": "0"}
    assert apply_default_xla_flags(env) == [] and "XLA_FLAGS" not in env
    with pytest.raises(ValueError, match="JAXPAGED_XLA_FLAGS"):
        apply_default_xla_flags({"JAXPAGED_XLA_FLAGS": "off"})


def test_importing_jaxpaged_sets_them_before_jax_starts():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPAGED_XLA_FLAGS")}
    out = subprocess.run(
        [sys.executable, "-c", "import os, jaxpaged, jax; jax.numpy.ones(2).block_until_ready();"
         " print(os.environ['XLA_FLAGS'])"],
        env=env, capture_output=True, text=True, check=True).stdout
    for name, value in DEFAULT_XLA_FLAGS.items():
        assert f"--{name}={value}" in out


def test_command_buffer_presets():
    env = {"JAXPAGED_COMMAND_BUFFERS": "all"}
    added = apply_default_xla_flags(env)
    assert "--xla_gpu_graph_min_graph_size=1" in added
    assert any(f.startswith("--xla_gpu_enable_command_buffer=") and "WHILE" in f for f in added)
    env = {"JAXPAGED_COMMAND_BUFFERS": "none", "XLA_FLAGS": "--xla_gpu_graph_min_graph_size=3"}
    assert "--xla_gpu_enable_command_buffer=" in apply_default_xla_flags(env)
    assert "--xla_gpu_graph_min_graph_size=3" in env["XLA_FLAGS"]
    assert apply_default_xla_flags({}) == [f"--{k}={v}" for k, v in DEFAULT_XLA_FLAGS.items()]
    with pytest.raises(ValueError, match="JAXPAGED_COMMAND_BUFFERS"):
        apply_default_xla_flags({"JAXPAGED_COMMAND_BUFFERS": "some"})
