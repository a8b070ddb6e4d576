"""pytest set-up: 8 CPU devices for jax, set before jax initialises its backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(os.environ.get("ELF_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared"))
FIXTURE_DIR = SHARED / "fixtures" / "reference_elf_tiny"


@pytest.fixture(scope="session")
def fixture_dir():
  """The reference tiny-ELF fixture directory (../shared/fixtures/reference_elf_tiny)."""
  if not FIXTURE_DIR.exists():
    pytest.fail(f"reference fixture not found at {FIXTURE_DIR}; set ELF_SHARED_DIR to the shared/ folder")
  return FIXTURE_DIR
