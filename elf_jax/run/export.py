"""`python -m elf_jax.run.export --source=DIR_OR_FILE --out=FILE.pt [--safetensors=EMA.safetensors]`: writes a
workdir's newest step (or any checkpoint `init_from` reads) in the authors' PyTorch layout."""
import sys

from absl import app, flags

from elf_jax.weights import published

_SOURCE = flags.DEFINE_string("source", None, "a training workdir, or a published msgpack / orbax / PyTorch checkpoint")
_OUT = flags.DEFINE_string("out", None, "the PyTorch checkpoint file to write (params and ema_params1)")
_SAFETENSORS = flags.DEFINE_string("safetensors", None, "also write the EMA weights to this safetensors file")
flags.mark_flags_as_required(["source", "out"])


def main(argv) -> None:
  del argv
  try:
    published.export_torch_checkpoint(_SOURCE.value, _OUT.value, _SAFETENSORS.value)
  except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}" + (f" and {_SAFETENSORS.value}" if _SAFETENSORS.value else ""))


if __name__ == "__main__":
  app.run(main)
