"""The tests: tests/X/test_Y.py tests elf_jax/X/Y.py, and integration/ holds the runs across modules and the checks
of the whole repository (docs/architecture.md#tests)."""
