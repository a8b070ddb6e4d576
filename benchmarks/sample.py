"""Sampler benchmark: samples/s, tokens/s and network evaluations per sample of the sampler (docs/method.md#sampling).

Builds the flow transformer at a size preset with random parameters, compiles the sampler once (warm-up) and
reports the median wall time over --repeats runs on whatever backend jax finds. With --cfg the first half of
every sequence is a (random) condition and classifier-free guidance runs as one batched call per step.

  python benchmarks/sample.py                                   # tiny model, CPU-friendly (< 1 min)
  python benchmarks/sample.py --size ELF-B --batch 64 --seq_len 1024 --preset owt_sde32
  python benchmarks/sample.py --size ELF-B --batch 64 --seq_len 1024 --preset cond_ode64 --cfg
"""
import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from elf_jax.config import ATTENTION_IMPLS, COMPUTE_DTYPES, SAMPLE_METHODS, SAMPLE_PRESETS, base_config
from elf_jax.model.elf import ELF, ModelConfig, count_params, init_params
from elf_jax.sampling import sampler as S

# name -> (depth, hidden, heads, latent dim C, vocab V); ELF-B/M/L as in docs/method.md#network with T5-small latents.
SIZES = {"tiny": (2, 64, 4, 32, 128), "ELF-B": (12, 768, 12, 512, 32100), "ELF-M": (24, 1056, 16, 512, 32100),
         "ELF-L": (32, 1280, 16, 512, 32100)}


def _parse_args():
  defaults = base_config()  # sampler settings not given here are config.py's (sample.*, flow.denoiser_noise_scale)
  preset_fields = "config.sample.* field; default: the --preset's"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size preset")
  p.add_argument("--latent_dim", type=int, default=None, help="override C of the size preset")
  p.add_argument("--vocab_size", type=int, default=None, help="override V of the size preset")
  p.add_argument("--batch", type=int, default=8, help="global batch (samples per sampler call)")
  p.add_argument("--seq_len", type=int, default=64, help="tokens per sample S")
  p.add_argument("--preset", choices=sorted(SAMPLE_PRESETS), default=defaults.sample.preset,
                 help="sampling preset; --method/--steps/--gamma/--guidance_scale/--cfg_scale given win over it")
  p.add_argument("--method", choices=SAMPLE_METHODS, default=None, help=preset_fields)
  p.add_argument("--steps", type=int, default=None, help=preset_fields)
  p.add_argument("--gamma", type=float, default=None, help=f"SDE churn ({preset_fields})")
  p.add_argument("--guidance_scale", type=float, default=None, help=f"self-conditioning guidance w ({preset_fields})")
  p.add_argument("--noise_scale", type=float, default=defaults.flow.denoiser_noise_scale,
                 help="σ of the initial / churn noise (OpenWebText: 2)")
  p.add_argument("--cfg", action="store_true", help="conditional sampling with classifier-free guidance")
  p.add_argument("--cfg_scale", type=float, default=None, help=f"CFG scale s (needs --cfg unless 1; {preset_fields})")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=defaults.model.compute_dtype, help="compute dtype")
  p.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default=defaults.model.attention_impl)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  return p.parse_args()


def _sample_config(args) -> S.SampleConfig:
  config = base_config()
  config.sample.preset = args.preset
  names = ("method", "steps", "gamma", "guidance_scale", "cfg_scale")
  explicit = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
  # Random parameters: any token ids do; T5's EOS / pad.
  sc = S.SampleConfig.from_config(config, noise_scale=args.noise_scale, eos_id=1, pad_id=0, **explicit)
  if sc.cfg_scale != 1.0 and not args.cfg:
    raise SystemExit(f"cfg_scale={sc.cfg_scale} (--preset {args.preset}) is classifier-free guidance, which needs a "
                     "condition: add --cfg")
  return sc


def main():
  args = _parse_args()
  depth, hidden, heads, latent, vocab = SIZES[args.size]
  mc = ModelConfig.from_config(base_config(), latent_dim=args.latent_dim or latent, hidden_size=hidden, depth=depth,
                               num_heads=heads, vocab_size=args.vocab_size or vocab, compute_dtype=args.dtype,
                               attention_impl=args.attention_impl)
  model = ELF(mc)
  params = nn.unbox(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)))
  config = _sample_config(args)
  sampler = S.make_sampler(model, config)
  cond = None
  if args.cfg:
    k = jax.random.key(1)
    cond = {"latents": jax.random.normal(k, (args.batch, args.seq_len, mc.latent_dim)),
            "mask": jnp.broadcast_to(jnp.arange(args.seq_len) < args.seq_len // 2, (args.batch, args.seq_len))}

  def run(seed):
    out = S.sample_from_seed(sampler, params, jax.random.key(seed), config, batch=args.batch, seq_len=args.seq_len,
                             latent_dim=mc.latent_dim, cond=cond)
    return jax.block_until_ready(out.ids)

  for i in range(args.warmup):
    run(i)
  times = []
  for i in range(args.repeats):
    start = time.perf_counter()
    run(args.warmup + i)
    times.append(time.perf_counter() - start)
  sec = statistics.median(times)
  evals = S.evaluations_per_sample(config.steps, config.cfg_scale != 1.0)
  print(f"backend={jax.default_backend()} devices={jax.device_count()} model={args.size} "
        f"params={count_params(params) / 1e6:.2f}M dtype={args.dtype} attention={args.attention_impl}")
  print(f"batch={args.batch} seq_len={args.seq_len} {dataclasses.asdict(config)}")
  print(f"median {sec * 1e3:.1f} ms per call over {args.repeats} repeats: {args.batch / sec:.2f} samples/s, "
        f"{args.batch * args.seq_len / sec:.0f} tokens/s, {evals} network evaluations per sample "
        f"({config.steps} steps{' x 2 (CFG, batched)' if config.cfg_scale != 1.0 else ''} + 1 decode)")


if __name__ == "__main__":
  main()
