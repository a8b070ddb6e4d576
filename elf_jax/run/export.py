"""`python -m elf_jax.run.export --source=DIR_OR_FILE [--out=FILE.pt] [--safetensors=EMA.safetensors]`: writes a
workdir's newest step (or any checkpoint `init_from` reads) in the authors' PyTorch layout, its EMA weights as
safetensors, or both."""
import sys

from absl import app, flags

from elf_jax.weights import published

_SOURCE = flags.DEFINE_string("source", None, "a training workdir, or a published msgpack / orbax / PyTorch checkpoint")
_OUT = flags.DEFINE_string("out", None, "the PyTorch checkpoint file to write (params and ema_params1; needs torch)")
_SAFETENSORS = flags.DEFINE_string("safetensors", None, "the safetensors file to write the EMA weights to (no torch "
                                   "needed; elf_jax.load reads it)")
flags.mark_flags_as_required(["source"])


def main(argv) -> None:
  del argv
  try:
    published.export_torch_checkpoint(_SOURCE.value, _OUT.value, _SAFETENSORS.value)
  except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
    sys.exit(f"error: {e}")
  print("wrote " + " and ".join(f for f in (_OUT.value, _SAFETENSORS.value) if f))


if __name__ == "__main__":
  app.run(main)
