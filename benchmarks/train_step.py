r"""Train-step benchmark: step time, tokens/s, memory, FLOPs and MFU, against the reference step schedule.

Variants, all on the same network, the same batch and the same per-step noise (every variant starts from the same
state, so step k draws the same decoder coins in each), timed round-robin so that load on a shared machine hits
them alike:
  ours        the library train step (`elf_jax.train.step`): a denoising group runs ONE no-gradient pass with
              x_sc = 0 (self-conditioning input and v_uncond) over the whole group (over its self-conditioned
              examples only under the opt-in flow.self_cond_draw=fixed_count) + one forward/backward whose
              stop-gradient output is v_cond; a decoding group runs one forward/backward.
  reference   the reference schedule: a denoising group runs THREE no-gradient passes (x_sc = 0 for
              self-conditioning, x_sc = 0 again for v_uncond, x_sc = x̂_uncond for v_cond) + one forward/backward;
              a decoding group one forward/backward. It is the library step with `loss.denoiser_loss` swapped for
              `reference_denoiser_loss` below; optimisation barriers keep XLA from merging the repeated passes
              (PyTorch runs them eagerly).
  cached      `ours` fed raw encoder outputs (`batch["latents"]`, as from `data.latent_cache_dir`): no encoder.
  remat=...   `ours` with `model.remat` = full / dots_saveable (--remat), for the memory effect.

FLOPs: "compiled" is XLA's `cost_analysis()` of the whole step (encoder, optimizer and EMA included). It counts a
`lax.cond` as its costlier branch (so it over-counts steps whose groups took the cheaper one) and the body of a
while loop (`lax.map` over G > 1 coin groups) ONCE, so it under-counts those steps by about G (checked on jax
0.10 CPU with a bare cond and map). "formula" counts the flow transformer only: 2 FLOPs
per multiply-add of every matmul the pass runs (input projections over S tokens, blocks over L = S + 12 tokens,
attention scores and weighted sum 4·L²·H per block, final layer or readout head over S tokens), a no-gradient
pass = 1 forward (times the fraction of the group it runs on), a forward/backward = 3 forwards; i.e. 2·N·tokens per no-grad pass and 6·N·tokens per
forward/backward with N the matmul parameters the pass uses, plus attention. MFU = formula FLOPs / step time /
--peak_tflops.

  python benchmarks/train_step.py --config configs/tiny.py
  python benchmarks/train_step.py --config configs/owt_b.py --batch 2 --seq_len 128 --steps 3
  python benchmarks/train_step.py --config configs/owt_b.py --batch 64 --seq_len 1024 --peak_tflops 989 \
      --set model.compute_dtype=bfloat16 --remat
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elf_jax import flow
from elf_jax.data import latent_cache
from elf_jax.model.elf import ELF, ModelConfig, count_params
from elf_jax.model.latents import build_encoder
from elf_jax.train import loss as L
from elf_jax.train import optim
from elf_jax.train import step as step_lib

T5_SMALL = dict(random_num_layers=6, random_num_heads=8, random_d_kv=64, random_d_ff=2048)


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/tiny.py", help="config file with get_config()")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.depth=4 --set model.compute_dtype=bfloat16 (repeatable)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default optim.global_batch_size)")
  p.add_argument("--seq_len", type=int, default=None, help="tokens per row S (default data.max_length)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compilation")
  p.add_argument("--variants", default="ours,reference,cached", help="comma-separated: ours,reference,cached")
  p.add_argument("--remat", action="store_true", help="also time ours with model.remat=full and dots_saveable")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak of the device for MFU (0 = do not print MFU)")
  args = p.parse_args()
  for v in args.variants.split(","):
    if v not in ("ours", "reference", "cached"):
      p.error(f"unknown variant {v!r} in --variants; choose from ours, reference, cached")
  return args


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """get_config() of `path` with KEY=VALUE overrides (values parsed as the field's current type)."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    old = node[leaf]
    node[leaf] = (value.lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(value)
  return config


def reference_denoiser_loss(model, params, batch, noise, fc: L.FlowConfig, dropout_rng):
  """The reference denoising step: three no-gradient passes (two identical) + one forward/backward.

  Same inputs, targets and loss as `loss.denoiser_loss`; only the number of network evaluations differs. Each pass
  goes through its own optimisation barrier (tagged with the pass number) so XLA cannot common-subexpression the
  identical passes away.
  """
  x0, cond = batch["x0"], batch["cond_mask"][..., None]
  t, w = noise["t"], noise["w"]
  clean_cond = lambda x: jnp.where(cond, x0, x)
  z = clean_cond(flow.interpolate(x0, noise["eps"], t, fc.denoiser_noise_scale))
  v = flow.velocity(x0, z, t, fc.t_eps)
  dropout = model.config.dropout_rate > 0

  def apply(tag, x_sc, train=False):
    p, zz, xs, _ = jax.lax.optimization_barrier((params, z, x_sc, jnp.int32(tag)))
    kw = dict(deterministic=not dropout, rngs={"dropout": dropout_rng}) if train and dropout else {}
    return model.apply({"params": p}, jnp.concatenate([zz, xs], -1), t, w, None, **kw)

  sg = jax.lax.stop_gradient
  x_first = sg(apply(0, clean_cond(jnp.zeros_like(z))))  # self-conditioning pass, x_sc = 0
  use_sc = noise["self_cond"][:, None, None]
  x_sc = clean_cond(jnp.where(use_sc, x_first, 0.0))
  x_hat = apply(1, x_sc, train=True)  # the forward/backward pass
  x_uncond = sg(apply(2, clean_cond(jnp.zeros_like(z))))  # v_uncond: the same computation as the first pass
  x_cond = sg(apply(3, clean_cond(x_uncond)))  # v_cond
  target = jnp.where(use_sc, flow.guided_target(v, flow.velocity(x_cond, z, t, fc.t_eps),
                                                flow.velocity(x_uncond, z, t, fc.t_eps), w), v)
  v_hat = flow.velocity(x_hat, z, t, fc.t_eps)
  return flow.masked_mean(jnp.mean(jnp.square(v_hat - target), -1), batch["loss_mask"])


def forward_flops(mc: ModelConfig, seq_len: int, decode: bool) -> float:
  """FLOPs of one forward pass of the flow transformer for one example of S = seq_len tokens (module docstring)."""
  c, h, m, bn = mc.latent_dim, mc.hidden_size, mc.swiglu_hidden, mc.bottleneck_dim
  length = seq_len + mc.num_prefix
  embed = 2 * (2 * c * c + c * bn + bn * h) * seq_len
  block = 2 * (4 * h * h + 3 * h * m) * length + 4 * length * length * h
  head = 2 * (h * c + c * mc.vocab_size) if decode else 2 * h * c
  return embed + mc.depth * block + head * seq_len


def step_formula_flops(mc, seq_len, group_size, decode_coins, no_grad_passes: float) -> float:
  """Formula FLOPs of one step: per denoising group `no_grad_passes` full-group forwards + a forward/backward
  (3 forwards), per decoding group a forward/backward."""
  den, dec = forward_flops(mc, seq_len, False), forward_flops(mc, seq_len, True)
  n_dec = float(np.sum(decode_coins))
  n_den = len(decode_coins) - n_dec
  return group_size * (n_den * (no_grad_passes + 3) * den + n_dec * 3 * dec)


def _compile(fn, *args):
  compiled = jax.jit(fn, donate_argnums=(0,)).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return compiled, (cost or {}).get("flops", float("nan")), mem


def main():
  args = _parse_args()
  config = load_config(args.config, args.set)
  if config.encoder.name_or_path == "t5-small":  # offline: random weights, T5-small's shapes (same encoder cost)
    config.encoder.update(T5_SMALL)
  config.encoder.name_or_path, config.encoder.measure_latent_stats = "random", False
  batch_size = args.batch or config.optim.global_batch_size
  seq_len = args.seq_len or config.data.max_length
  config.data.max_length = seq_len
  config.optim.grad_accum_steps = 1

  encoder, enc_params = build_encoder(config)
  mc = ModelConfig.from_config(config)
  groups = step_lib.resolve_num_groups(config, None, batch_size)
  fc = L.FlowConfig.from_config(config)
  optimizer = optim.make_optimizer(config.optim, optim.make_schedule(config.optim, 1000, 10**6))
  rng = jax.random.key(config.seed)
  ids = jax.random.randint(rng, (batch_size, seq_len), 2, min(mc.vocab_size, encoder.vocab_size))
  lengths = seq_len - (jnp.arange(batch_size) % 4) * (seq_len // 8)  # some padding, as real rows have
  valid = jnp.arange(seq_len)[None] < lengths[:, None]
  batch = dict(ids=ids, valid=valid, cond_mask=jnp.zeros_like(valid), loss_mask=valid)
  latents = latent_cache.raw_encode_fn(encoder)(enc_params, ids, valid)  # what the latent cache stores
  state0 = jax.jit(lambda: step_lib.init_state(ELF(mc), optimizer, rng, seq_len))()

  group_size = batch_size // groups
  ours_passes = L.self_cond_pass_rows(group_size, fc) / group_size  # the x_sc = 0 pass's share of the group
  variants = {}  # name -> (model config, batch, denoiser loss, no-grad forwards per denoising group)
  for name in args.variants.split(","):
    if name == "ours":
      variants[name] = (mc, batch, None, ours_passes)
    elif name == "reference":
      variants[name] = (mc, batch, reference_denoiser_loss, 3)
    else:
      variants[name] = (mc, dict(batch, latents=latents), None, ours_passes)
  if args.remat:
    for policy in ("full", "dots_saveable"):
      variants[f"remat={policy}"] = (dataclasses.replace(mc, remat=policy), batch, None, ours_passes)

  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} config={args.config} "
        f"overrides={args.set}")
  print(f"model: depth={mc.depth} H={mc.hidden_size} heads={mc.num_heads} C={mc.latent_dim} V={mc.vocab_size} "
        f"params={count_params(state0.params) / 1e6:.2f}M dtype={mc.compute_dtype} remat={mc.remat}; "
        f"encoder: random T5 {config.encoder.random_num_layers} layers; optimizer={config.optim.optimizer}")
  print(f"batch={batch_size} seq_len={seq_len} tokens/step={batch_size * seq_len} coin groups={groups} "
        f"decoder_prob={fc.decoder_prob}; median of {args.steps} steps after {args.warmup} warm-up, round-robin")

  compiled = {}
  for name, (vmc, vbatch, den_loss, _) in variants.items():
    obj = step_lib.Objective(ELF(vmc), encoder, fc, groups)
    patch = mock.patch.object(L, "denoiser_loss", den_loss) if den_loss else contextlib.nullcontext()
    with patch:
      fn = step_lib.make_train_step(obj, optimizer, config.optim)
      compiled[name] = _compile(fn, jax.tree_util.tree_map(jnp.copy, state0), enc_params, vbatch)

  states = {name: jax.tree_util.tree_map(jnp.copy, state0) for name in variants}
  times = {name: [] for name in variants}
  coins, first_loss, state_rng = [], {}, state0.rng
  draw = jax.jit(lambda r: L.draw_noise(r, batch_size, seq_len, mc.latent_dim, fc, groups)["group_decode"])
  for i in range(args.warmup + args.steps):
    state_rng, step_rng = jax.random.split(state_rng)  # as train_step does: the step's coins
    if i >= args.warmup:
      coins.append(np.asarray(draw(step_rng)))
    for name, (_, vbatch, _, _) in variants.items():
      start = time.perf_counter()
      states[name], metrics = compiled[name][0](states[name], enc_params, vbatch)
      jax.block_until_ready(metrics)
      if i == 0:
        first_loss[name] = float(metrics["loss"])
      if i >= args.warmup:
        times[name].append(time.perf_counter() - start)

  print(f"decode fraction of the timed steps: {np.mean(coins):.2f}; first-step loss per variant: "
        + ", ".join(f"{n} {v:.5f}" for n, v in first_loss.items()))
  header = (f"{'variant':20} {'median ms':>10} {'tokens/s':>10} {'vs ours':>8} {'XLA GFLOP':>10} "
            f"{'formula GFLOP':>13} {'MFU %':>6} {'temp MiB':>9} {'args+out MiB':>12}")
  print(header)
  print("-" * len(header))
  base = statistics.median(times[next(iter(variants))])
  for name, (vmc, _, _, passes) in variants.items():
    sec = statistics.median(times[name])
    formula = [step_formula_flops(vmc, seq_len, group_size, c, passes) for c in coins]
    mfu = statistics.median(f / t for f, t in zip(formula, times[name])) / (args.peak_tflops * 1e12) \
        if args.peak_tflops > 0 else float("nan")
    _, xla_flops, mem = compiled[name]
    temp = mem.temp_size_in_bytes / 2**20 if mem else float("nan")
    io = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20 if mem \
        else float("nan")
    print(f"{name:20} {sec * 1e3:10.1f} {batch_size * seq_len / sec:10.0f} {base / sec:7.2f}x "
          f"{xla_flops / 1e9:10.3f} {np.mean(formula) / 1e9:13.3f} {mfu * 100:6.1f} {temp:9.1f} {io:12.1f}",
          flush=True)
  if "ours" in times and "reference" in times:
    per_step = [r / o for o, r in zip(times["ours"], times["reference"])]
    ratio = statistics.median(times["reference"]) / statistics.median(times["ours"])
    print(f"ours vs reference schedule: {ratio:.2f}x throughput (ratio of medians), {statistics.median(per_step):.2f}x "
          f"(median of same-step ratios: {', '.join(f'{r:.2f}' for r in per_step)})")
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    print(f"device memory high-water mark over the run: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
  print("XLA GFLOP: cost_analysis() of the compiled step (encoder + optimizer included; lax.cond counted as its "
        "costlier branch, a lax.map over G coin groups counted once). formula: flow transformer only, realised coins.")


if __name__ == "__main__":
  main()
