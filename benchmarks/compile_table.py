r"""Per-chip memory and FLOPs of the compiled ELF-B / M / L train step on a TPU slice, compiled ahead of time here.

  JAX_PLATFORMS=cpu python benchmarks/compile_table.py                       # v5p-64, writes compile_v5p64.md
  JAX_PLATFORMS=cpu python benchmarks/compile_table.py --topology=v5p-128 --out=benchmarks/compile_v5p128.md

Needs libtpu (`pip install -e .[compile]`). Each size is its OpenWebText config as shipped (configs/owt_{b,m,l}.py,
loaded by path as --config does: global batch 512 x 1024 tokens, the config's remat, precision and attention) with
the config's mesh (pure data parallelism over the slice's chips) unless --mesh_preset (`elf_jax.config.MESH_PRESETS`)
is given; --remat / --block_loop / --attention_impl / --compute_dtype override the configs' choices for every size.
A size that fails to compile (e.g. out of HBM) is recorded with its error. --append adds rows to an existing table.
"""
import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback

import jax
import ml_collections

from elf_jax.config import load_config_file
from elf_jax.run import aot, hbm

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SIZES = (("ELF-B", "b"), ("ELF-M", "m"), ("ELF-L", "l"))
OVERRIDES = ("remat", "block_loop", "attention_impl", "compute_dtype")  # model.* fields a flag may set for every size
TARGET_HEADROOM = 30.0  # % of HBM the shipped configs leave free (issue: configs that fit)


def load_config(size: str) -> ml_collections.ConfigDict:
  """configs/owt_<size>.py's `get_config()`, loaded by path (as `--config` does)."""
  return load_config_file(os.path.join(CONFIGS, f"owt_{size}.py"))


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def model_tflops_per_chip(config: ml_collections.ConfigDict, report: aot.CompileReport) -> float:
  """≈ 8 · N · T / 1e12: a denoising step's self-conditioning pass (2 N T) and forward + backward (6 N T) over the
  T = rows × (S + prefix tokens) a chip holds, N = the flow network's parameters (attention scores, the frozen
  encoder and the 20% cheaper decoding groups not counted)."""
  m = config.model
  tokens = report.batch_shape[0] * (report.batch_shape[1] + m.num_time_tokens + m.num_guidance_tokens +
                                    m.num_mode_tokens) / report.num_devices
  return 8 * report.num_params * tokens / 1e12


def _status(headroom: float | None) -> str:
  if headroom is None or headroom >= TARGET_HEADROOM:
    return "ok"
  return f"fits, below {TARGET_HEADROOM:.0f}% headroom" if headroom >= 0 else "does not fit"


def _row(name: str, config: ml_collections.ConfigDict, report: aot.CompileReport | None, seconds: float,
         error: str = "") -> str:
  m = config.model
  head = f"| {name} | {m.remat} | {m.block_loop} | {m.attention_impl} | {m.compute_dtype} |"
  if report is None:
    return head + " — |" * 10 + f" {seconds:.0f} | failed: `{error}` |"
  gib = lambda b: f"{b / hbm.GIB:.2f}"
  u, headroom = report.memory, report.headroom_percent
  mesh = "×".join(str(v) for v in report.mesh_shape.values())
  return (f"{head} {report.num_params / 1e6:.1f}M | {mesh} | {gib(u.argument_bytes)} | {gib(u.output_bytes)} | "
          f"{gib(u.temp_bytes)} | {gib(u.code_bytes)} | **{gib(u.total_bytes)}** | "
          f"**{'—' if headroom is None else f'{headroom:.0f}%'}** | {report.flops / 1e12:.2f} | "
          f"{model_tflops_per_chip(config, report):.1f} | {seconds:.0f} | {_status(headroom)} |")


_TABLE_HEAD = ("| model | remat | blocks | attention | precision | params | mesh | arguments | outputs | temporaries "
               "| code | total | HBM headroom | TFLOPs/chip (XLA) | ≈ model TFLOPs/chip | compile s | status |\n" +
               "|---" * 17 + "|")


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
      "The whole optimizer step of `elf_jax.objective.step.make_train_step` (declared in/out shardings, donated state;",
      "its micro-batches in one `lax.scan`, the blocks as `model.block_loop` says) for each config as shipped",
      "(configs/owt_{b,m,l}.py: global batch 512 × 1024 tokens, Muon, the config's remat, attention and precision)",
      f"on the mesh of the {topology} preset. Memory is per chip in GiB from XLA's `memory_analysis()`; total =",
      "arguments + outputs − outputs aliased to the donated state + temporaries + generated code; HBM headroom =",
      "the share of the chip's HBM (`elf_jax.run.hbm`) the total leaves free (the shipped configs aim at",
      f">= {TARGET_HEADROOM:.0f}%). TFLOPs (XLA) are per chip per step from XLA's `cost_analysis()`, which counts the",
      "body of a scan / while loop once (one block of the `nn.scan`, one micro-batch): a lower bound, not",
      "comparable across depths. ≈ model TFLOPs = 8 · N · T (self-conditioning pass +",
      "forward and backward of the flow network's N parameters over the T tokens per chip). Mesh = data × fsdp ×",
      "tensor; remat = `model.remat` (activation checkpointing per block); blocks = `model.block_loop` (`scan`: one",
      "compiled block body; `unrolled`: every block compiled in line); attention `auto` = the Pallas flash kernel on",
      "TPU. Compile seconds are wall time on this host (shared, so they vary with its load).",
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
  parser.add_argument("--mesh_preset", default="", help="elf_jax.config.MESH_PRESETS name; default: the config's")
  parser.add_argument("--sizes", default="b,m,l", help="comma-separated subset of b,m,l, compiled in this order")
  parser.add_argument("--remat", default="", help="model.remat for every size (none | full | dots_saveable); "
                      "default: each config's")
  parser.add_argument("--block_loop", default="", help="model.block_loop for every size (scan | unrolled); "
                      "default: each config's")
  parser.add_argument("--attention_impl", default="", help="model.attention_impl for every size (xla | pallas | "
                      "auto); default: each config's")
  parser.add_argument("--compute_dtype", default="", help="model.compute_dtype for every size (float32 | "
                      "bfloat16); default: each config's")
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
    config = load_config(size)
    config.mesh.preset = args.mesh_preset or config.mesh.preset
    for field in OVERRIDES:
      config.model[field] = getattr(args, field) or config.model[field]
    start = time.perf_counter()
    try:
      report, error = aot.compile_for_topology(config, args.topology), ""
      print(report.describe(), flush=True)
    except Exception as e:  # record the failure in the table and go on with the next size
      traceback.print_exc()
      report, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    _add_row(args.out, _row(name, config, report, time.perf_counter() - start, error))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
