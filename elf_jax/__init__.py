"""elf_jax: ELF (Embedded Language Flows) in JAX/Flax.

`elf_jax.load(id_or_path, config=None, **overrides)` returns a model to sample, complete, condition and score
(`elf_jax.run.api`); it is imported on first use, so that `import elf_jax.data` loads no model code.
"""

def __getattr__(name):
  if name in ("load", "Model"):
    from elf_jax.run import api  # pylint: disable=import-outside-toplevel
    return getattr(api, name)
  raise AttributeError(f"module 'elf_jax' has no attribute {name!r}")
