r"""Per-chip memory and FLOPs of the compiled ELF-B / M / L train step on a TPU slice, compiled ahead of time here.

  JAX_PLATFORMS=cpu python benchmarks/compile_table.py                       # v5p-64, writes compile_v5p64.md
  JAX_PLATFORMS=cpu python benchmarks/compile_table.py --topology=v5p-128 --out=benchmarks/compile_v5p128.md

Needs libtpu (`pip install -e .[compile]`). Each size uses its OpenWebText config (configs/owt_{b,m,l}.py: global
batch 512 x 1024 tokens) with the mesh of the slice's preset (`elf_jax.parallel.mesh.MESH_PRESETS`, pure data
parallelism on v5p-64) unless --mesh_preset is given. A size that fails to compile (e.g. out of HBM) is recorded with
its error. --append adds rows to an existing table (e.g. a second run with --remat=full).
"""
import argparse
import importlib.metadata
import os
import sys
import time
import traceback

import jax

from elf_jax.parallel import aot
from elf_jax.parallel import hbm

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
sys.path.insert(0, CONFIGS)
import owt_b  # noqa: E402  (configs are plain modules; owt_b holds the B / M / L recipe)

SIZES = (("ELF-B", "b"), ("ELF-M", "m"), ("ELF-L", "l"))


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _row(name: str, remat: str, report: aot.CompileReport | None, seconds: float, error: str = "") -> str:
  if report is None:
    return f"| {name} | {remat} |" + " — |" * 9 + f" {seconds:.0f} | failed: `{error}` |"
  gib = lambda b: f"{b / hbm.GIB:.2f}"
  m, headroom = report.memory, report.headroom_percent
  mesh = "×".join(str(v) for v in report.mesh_shape.values())
  return (f"| {name} | {remat} | {report.num_params / 1e6:.1f}M | {mesh} | {gib(m.argument_bytes)} | "
          f"{gib(m.output_bytes)} | {gib(m.temp_bytes)} | {gib(m.code_bytes)} | {gib(m.total_bytes)} | "
          f"{'—' if headroom is None else f'{headroom:.0f}%'} | {report.flops / 1e12:.2f} | {seconds:.0f} | "
          f"{'ok' if headroom is None or headroom >= 0 else 'does not fit'} |")


_TABLE_HEAD = ("| model | remat | params | mesh | arguments | outputs | temporaries | code | total | HBM headroom "
               "| TFLOPs/chip | compile s | status |\n" + "|---" * 13 + "|")


def _start(path: str, topology: str, command: str, append: bool) -> None:
  """Writes the page header (or, with `append`, a note of this command) and an empty table head."""
  if append:
    with open(path, "a") as f:
      f.write(f"\nMore rows, from:\n\n```\n{command}\n```\n\n{_TABLE_HEAD}\n")
    return
  lines = [
      f"# ELF train step compiled ahead of time for TPU {topology}",
      "",
      f"Written by `benchmarks/compile_table.py` on a CPU host ({os.cpu_count()} cores): "
      f"jax {_version('jax')}, jaxlib {_version('jaxlib')}, libtpu {_version('libtpu')}.",
      "",
      "```",
      command,
      "```",
      "",
      "One micro-step of `elf_jax.train.step.make_train_step` (declared in/out shardings, donated state) at the",
      "reference global batch 512 × 1024 tokens, Muon, float32 (configs/owt_{b,m,l}.py). Memory is per chip in GiB",
      "from XLA's `memory_analysis()`; total = arguments + outputs − outputs aliased to the donated state +",
      "temporaries + generated code; HBM headroom = the share of the chip's HBM (`elf_jax.parallel.hbm`) the",
      "total leaves free. TFLOPs are per chip per step from XLA's `cost_analysis()` (the encoder, the",
      "flow network's forward/backward and the self-conditioning pass; XLA counts a `lax.cond` once per branch it",
      "compiles). Mesh = data × fsdp × tensor; remat = `model.remat` (activation checkpointing per block).",
      "",
      _TABLE_HEAD,
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _add_row(path: str, row: str) -> None:
  with open(path, "a") as f:
    f.write(row + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v5p-64", help=f"one of {', '.join(aot.TOPOLOGIES)}")
  parser.add_argument("--mesh_preset", default="", help="elf_jax.parallel.mesh preset; default: the slice's own")
  parser.add_argument("--sizes", default="b,m,l", help="comma-separated subset of b,m,l, compiled in this order")
  parser.add_argument("--remat", default="none", help="model.remat for every size: none | full | dots_saveable")
  parser.add_argument("--attention_impl", default="", help="model.attention_impl for every size: xla | pallas | "
                      "auto; default: the config's")
  parser.add_argument("--append", action="store_true", help="add the rows (and this command) to an existing --out")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "compile_v5p64.md"))
  args = parser.parse_args()
  if jax.default_backend() != "cpu":
    parser.error("run with JAX_PLATFORMS=cpu: libtpu serves only as the compiler here")
  command = "JAX_PLATFORMS=cpu python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
  names = dict((size, name) for name, size in SIZES)
  _start(args.out, args.topology, command, args.append)
  for size in args.sizes.split(","):  # in the order given
    if size not in names:
      parser.error(f"--sizes: unknown size {size!r}; expected a subset of b,m,l")
    name = names[size]
    config = owt_b.get_config(size)
    config.mesh.preset = args.mesh_preset
    config.model.remat = args.remat
    config.model.attention_impl = args.attention_impl or config.model.attention_impl
    start = time.perf_counter()
    try:
      report, error = aot.compile_for_topology(config, args.topology), ""
      print(report.describe(), flush=True)
    except Exception as e:  # record the failure in the table and go on with the next size
      traceback.print_exc()
      report, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    _add_row(args.out, _row(name, args.remat, report, time.perf_counter() - start, error))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
