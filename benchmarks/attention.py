"""Attention benchmark: XLA reference vs Pallas flash kernel at ELF-B/M/L shapes, forward and forward+backward.

Reports the median wall time over --repeats runs after --warmup runs, and the compiled program's temporary
memory (XLA's `memory_analysis()`: everything beyond inputs and outputs, i.e. where the L x L scores live). On
TPU / GPU the device's memory high-water mark over the whole run is printed at the end (`memory_stats()` has no
per-program peak).

On CPU the kernel runs in the Pallas interpreter, far too slow for full shapes: XLA is measured at the full
shapes and Pallas at a reduced length and batch (--small_len, --small_batch); every row prints its shape.

  python benchmarks/attention.py                          # per-device batch 16 (1 on CPU), float32
  python benchmarks/attention.py --batch 64 --dtype bfloat16 --models ELF-L
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from elf_jax.ops import attention as attn

SEQ_LEN = 1036  # 1024 tokens + 12 prefix (time, guidance, mode) tokens
MODELS = {"ELF-B": (12, 64), "ELF-M": (16, 66), "ELF-L": (16, 80)}  # name -> (heads, head_dim)
PREFIX_TOKENS = 12


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=None, help="per-device batch (16-64 on TPU/GPU); default 16, 1 on CPU")
  p.add_argument("--seq_len", type=int, default=SEQ_LEN, help="tokens per sequence L incl. the 12 prefix tokens")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
  p.add_argument("--impls", default="xla,pallas", help="comma-separated subset of xla,pallas")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--block_q", type=int, default=None, help="Pallas query block; default: per-platform")
  p.add_argument("--block_k", type=int, default=None, help="Pallas key block; default: per-platform")
  p.add_argument("--small_len", type=int, default=76, help="CPU only: L for the interpreted Pallas kernel")
  p.add_argument("--small_batch", type=int, default=1, help="CPU only: batch for the interpreted Pallas kernel")
  args = p.parse_args()
  for model in args.models.split(","):
    if model not in MODELS:
      p.error(f"unknown model {model!r} in --models; choose from {list(MODELS)}")
  for impl in args.impls.split(","):
    if impl not in ("xla", "pallas"):
      p.error(f"unknown impl {impl!r} in --impls; choose from xla, pallas")
  return args


def _inputs(batch, seq_len, heads, head_dim, dtype):
  """q, k, v, output cotangent (B, L, N, D) and a key mask with 0 to 3/8 of each example's data padded."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, d_out = (jax.random.normal(key, (batch, seq_len, heads, head_dim), dtype) for key in keys)
  data_len = seq_len - PREFIX_TOKENS
  valid = PREFIX_TOKENS + data_len - (jnp.arange(batch) % 4) * (data_len // 8)
  return q, k, v, d_out, jnp.arange(seq_len)[None, :] < valid[:, None]


def _programs(impl, block_q, block_k):
  def forward(q, k, v, d_out, mask):
    del d_out
    return attn.attention(q, k, v, mask, impl=impl, block_q=block_q, block_k=block_k)

  def forward_backward(q, k, v, d_out, mask):
    loss = lambda q, k, v: jnp.sum(forward(q, k, v, None, mask).astype(jnp.float32) * d_out)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return {"fwd": forward, "fwd+bwd": forward_backward}


def _measure(fn, args, warmup, repeats):
  """(median seconds, compiled temp bytes) of jit(fn)(*args)."""
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  return statistics.median(times), (memory.temp_size_in_bytes if memory is not None else float("nan"))


def main():
  args = _parse_args()
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  batch = args.batch if args.batch is not None else (1 if on_cpu else 16)
  dtype = jnp.dtype(args.dtype)
  print(f"backend {backend} ({jax.devices()[0].device_kind}), dtype {dtype.name}, "
        f"median of {args.repeats} after {args.warmup} warm-up")
  if on_cpu and "pallas" in args.impls:
    print(f"CPU: Pallas runs in the interpreter, so it is measured at batch {args.small_batch}, "
          f"L={args.small_len} (XLA at the full shapes); interpreter times say nothing about TPU/GPU speed.")
  header = f"{'model':6} {'impl':6} {'B x L x N x D':>20} {'pass':8} {'median ms':>10} {'temp MiB':>10}"
  print(header)
  print("-" * len(header))
  for model in args.models.split(","):
    heads, head_dim = MODELS[model]
    for impl in args.impls.split(","):
      small = on_cpu and impl == "pallas"
      b, length = (args.small_batch, args.small_len) if small else (batch, args.seq_len)
      inputs = _inputs(b, length, heads, head_dim, dtype)
      for name, fn in _programs(impl, args.block_q, args.block_k).items():
        seconds, temp = _measure(fn, inputs, args.warmup, args.repeats)
        shape = f"{b}x{length}x{heads}x{head_dim}"
        print(f"{model:6} {impl:6} {shape:>20} {name:8} {seconds * 1e3:10.2f} {temp / 2**20:10.1f}", flush=True)
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    print(f"device memory high-water mark over the run: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
