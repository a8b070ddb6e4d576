r"""Train-step benchmark: our step against the official ELF code's own `train_step`, plus step time, tokens/s,
memory, FLOPs and MFU of each variant.

Variants (same network, same batch, same optimizer; each is timed in ROUNDS: every round runs `--steps` steps of
each variant in turn, the order flipping every round, so that load on a shared machine hits them alike):
  ours        the library train step (`elf_jax.objective.step.make_train_step`, jit, no mesh).
  official    the authors' `train_step` (`--reference_src=PATH`, a checkout the user fetched, e.g.
              `git clone https://github.com/lillian039/ELF`; nothing of it is part of this repository), run as their
              train.py runs it: `jax.pmap(train_step, axis_name="batch")` on one device, their `TrainState`,
              `get_optimizer` + `create_learning_rate_fn` (same clip, optimizer, peak lr and warm-up as ours), their
              T5 encoder module and their network module. The network starts from OUR initial parameters (same
              names, docs/method.md#checkpoint-names; shapes checked) and the encoder weights are shared (the official
              module's random init, pickled in the official encoder format and read by `elf_jax.weights.encoder` for
              our side).
  cached      `ours` fed raw encoder outputs (`batch["latents"]`, as from `data.latent_cache_dir`): no encoder.
  scan, unrolled  `ours` with that `model.block_loop` (whatever the config sets).
  remat=...   `ours` with `model.remat` = full / dots_saveable (--remat), for the memory effect.

Each step is a denoising or a decoding step (one decoder coin per coin group; the official step draws one per
step). Every variant runs the SAME coin sequence: before each step the benchmark picks the state's key (ours:
`TrainState.rng`; official: `dropout_rng`) so that the step draws the wanted coin (checked afterwards from the
step's metrics). Warm-up alternates denoising and decoding steps; each round runs round(p·steps) decoding steps
(at least one, and at least one denoising step, when 0 < p < 1 and steps >= 2) and the rest denoising. Per round
and variant the median denoising- and decoding-step times are combined at the decoder probability p:
expected = (1 − p)·denoise + p·decode. The headline ratio is the median over rounds of
expected(variant) / expected(first variant); tokens/s = batch·S / median expected step time.

FLOPs: "compiled" is XLA's `cost_analysis()` of the whole step (encoder, optimizer and EMA included; a `lax.cond`
is counted as its costlier branch, and the body of a while loop — `lax.map` over G > 1 coin groups — once).
"formula" counts the flow transformer only, for the p mix: 2 FLOPs per multiply-add of every matmul a pass runs
(input projections over S tokens, blocks over L = S + prefix tokens, attention scores and weighted sum 4·L²·H per
block, final layer or readout head over S tokens); a no-gradient pass = 1 forward (times the share of the group it
runs on), a forward/backward = 3 forwards. A denoising step of ours runs one no-gradient pass (x_sc = 0: the
self-conditioning input and v_uncond) + one forward/backward (v_cond is its stop-gradient output); the official
step runs three no-gradient passes (x_sc = 0, x_sc = 0 again for v_uncond, x_sc = x̂_uncond for v_cond) + one
forward/backward. Decoding steps run one forward/backward on both. MFU = formula FLOPs / time / --peak_tflops.

  python benchmarks/train_step.py --config=configs/tiny.py --batch 64 --config.optim.optimizer=muon \
      --reference_src ~/ELF --rounds 5 --steps 10
  python benchmarks/train_step.py --config=configs/owt_b.py --batch 12 --seq_len 128 \
      --config.optim.optimizer=adamw --reference_src ~/ELF --rounds 3 --steps 4
  python benchmarks/train_step.py --config=configs/tiny.py                     # ours and cached only
  python benchmarks/train_step.py --config=configs/owt_b.py --batch 64 --seq_len 1024 --peak_tflops 989 \
      --config.model.compute_dtype=bfloat16 --remat
"""
import argparse
from collections.abc import Callable
import dataclasses
import importlib
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import step_profile  # benchmarks/step_profile.py (the script's folder is on sys.path)

from elf_jax.model import elf as elf_lib
from elf_jax.model.elf import ELF, ModelConfig, count_params
from elf_jax.objective import flow, optim
from elf_jax.objective import loss as L
from elf_jax.objective import step as step_lib
from elf_jax.weights.encoder import build_encoder

T5_SMALL = dict(random_num_layers=6, random_num_heads=8, random_d_kv=64, random_d_ff=2048)
OFFICIAL_FILES = ("train_step.py", "modules/model.py", "modules/t5_encoder.py", "utils/train_utils.py",
                  "utils/encoder_utils.py", "configs/config.py")
SCHEDULE_STEPS = 10**6  # total optimizer updates given to both lr schedules (only the warm-up matters here)
VARIANTS = ("ours", "official", "cached", "scan", "unrolled")


_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "config file with get_config(); fields set by --config.group.field=value")


def _parse_args():
  """The config (absl: --config=PATH --config.x=y, parsed first) and the benchmark's own arguments (argparse)."""
  rest = flags.FLAGS(sys.argv, known_only=True)
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=None, help="global batch (default optim.global_batch_size)")
  p.add_argument("--seq_len", type=int, default=None, help="tokens per row S (default data.max_length)")
  p.add_argument("--reference_src", default=None, metavar="PATH",
                 help="checkout of the official ELF code (its root or its src/): adds the 'official' variant")
  p.add_argument("--rounds", type=int, default=3, help="timing rounds (the variants alternate within each)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps per variant after compilation (alternately denoising and decoding)")
  p.add_argument("--variants", default=None,
                 help="comma-separated from ours,official,cached,scan,unrolled (default: ours,official with "
                      "--reference_src, else ours,cached); scan / unrolled: ours with that model.block_loop")
  p.add_argument("--remat", action="store_true", help="also time ours with model.remat=full and dots_saveable")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="peak of the device for MFU (0 = do not print MFU)")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="after timing, trace one denoising and one decoding step of each variant into DIR and print "
                      "where the time goes (CPU backend; with libtpu installed set JAX_PLATFORMS=cpu)")
  p.add_argument("--profile_top", type=int, default=12, help="with --profile: the costliest instructions listed")
  args = p.parse_args(rest[1:])
  args.config = config_flags.get_config_filename(flags.FLAGS["config"])
  args.overrides = config_flags.get_override_values(flags.FLAGS["config"])
  args.variants = (args.variants or ("ours,official" if args.reference_src else "ours,cached")).split(",")
  for v in args.variants:
    if v not in VARIANTS:
      p.error(f"unknown variant {v!r} in --variants; choose from {', '.join(VARIANTS)}")
  if "official" in args.variants and not args.reference_src:
    p.error("the 'official' variant needs --reference_src=PATH (a checkout of https://github.com/lillian039/ELF)")
  if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
    p.error("--rounds and --steps must be >= 1 and --warmup >= 0")
  return args


# ----------------------------------------------------------------------------------------------------------------
# The official code, imported from the user's checkout.


def import_official(path: str) -> dict[str, Any]:
  """The official modules from a checkout (its root or its `src/`), put first on sys.path.

  Raises:
    SystemExit: PATH does not hold the official code, or one of its imports fails (the missing package is named).
  """
  path = os.path.abspath(os.path.expanduser(path))
  src = next((d for d in (os.path.join(path, "src"), path)
              if all(os.path.isfile(os.path.join(d, f)) for f in OFFICIAL_FILES)), None)
  if src is None:
    raise SystemExit(f"--reference_src={path} does not hold the official ELF code: expected "
                     f"{', '.join(OFFICIAL_FILES)} under it or under its src/ (get it with "
                     "`git clone https://github.com/lillian039/ELF` and pass the clone's root)")
  sys.path.insert(0, src)
  names = dict(step="train_step", model="modules.model", t5="modules.t5_encoder", train_utils="utils.train_utils",
               encoder_utils="utils.encoder_utils", config="configs.config")
  modules = {}
  for key, name in names.items():
    try:
      modules[key] = importlib.import_module(name)
    except ModuleNotFoundError as e:
      raise SystemExit(f"importing the official {name} from {src} failed: package {e.name!r} is missing "
                       f"(pip install {e.name})") from None
    where = os.path.abspath(modules[key].__file__)
    if not where.startswith(src + os.sep):
      raise SystemExit(f"`import {name}` found {where}, not the official file under {src}: another package of "
                       "that name shadows it; run from a directory without it")
  return modules


def official_config(mod, config: ml_collections.ConfigDict, seq_len: int, peak_lr: float):
  """The official Config object with every field its train_step and get_optimizer read set from ours."""
  f, o, e = config.flow, config.optim, config.encoder
  c = mod.Config()
  fields = dict(
      max_length=seq_len, latent_mean=e.latent_mean, latent_std=e.latent_std, t_eps=f.t_eps,
      denoiser_p_mean=f.P_mean, denoiser_p_std=f.P_std, denoiser_noise_scale=f.denoiser_noise_scale,
      time_schedule=f.time_schedule, decoder_prob=f.decoder_prob, decoder_noise_scale=f.decoder_noise_scale,
      decoder_p_mean=f.decoder_m_mean, decoder_p_std=f.decoder_m_std, label_drop_prob=0.0,
      self_cond_prob=f.self_cond_prob, self_cond_cfg_min=f.guidance_min, self_cond_cfg_max=f.guidance_max,
      num_time_tokens=config.model.num_time_tokens, num_self_cond_cfg_tokens=config.model.num_guidance_tokens,
      num_model_mode_tokens=config.model.num_mode_tokens, bottleneck_dim=config.model.bottleneck_dim,
      attn_dropout=config.model.dropout_rate, proj_dropout=config.model.dropout_rate, pad_token=f.pad_token,
      optimizer=o.optimizer, weight_decay=o.weight_decay, adam_b1=o.adamw_b1, adam_b2=o.adamw_b2,
      grad_accum_steps=1, ema_decay1=o.ema_decay, lr=peak_lr, lr_schedule=o.schedule)
  for name, value in fields.items():
    if not hasattr(c, name):
      raise SystemExit(f"the official Config has no field {name!r}: --reference_src holds another version of it")
    setattr(c, name, value)
  return c


def check_optimizer_settings(config: ml_collections.ConfigDict):
  """The official get_optimizer fixes clip 1.0 and optax's Muon defaults: ours must use the same to compare."""
  o = config.optim
  fixed = dict(grad_clip=1.0, muon_momentum=0.95, muon_adam_b1=0.9, muon_adam_b2=0.999)
  wrong = {k: o[k] for k, v in fixed.items() if k in o and o[k] != v}
  if wrong:
    raise SystemExit(f"optim settings {wrong} differ from the official optimizer's fixed values {fixed}: "
                     "drop those --config overrides to compare with the official step")


def write_official_encoder(t5_mod, config: ml_collections.ConfigDict, vocab: int, directory: str):
  """(pickle path, module): the official T5 encoder module at our encoder's dims, its random weights pickled in the
  official encoder format (which `build_encoder` reads for our side)."""
  e = config.encoder
  t5_config = t5_mod.T5EncoderConfig(vocab_size=vocab, d_model=e.dim, d_kv=e.random_d_kv, d_ff=e.random_d_ff,
                                     num_layers=e.random_num_layers, num_heads=e.random_num_heads,
                                     dropout_rate=0.0, is_gated_act=False)
  module = t5_mod.T5Encoder(config=t5_config)
  params = module.init(jax.random.key(e.random_seed), input_ids=jnp.ones((1, 8), jnp.int32),
                       attention_mask=jnp.ones((1, 8), jnp.float32), deterministic=True)["params"]
  path = os.path.join(directory, "official_random_encoder.pkl")
  with open(path, "wb") as fh:
    pickle.dump({"params": jax.tree.map(np.asarray, params)}, fh)
  return path, module


def build_official(mods, config, mc: ModelConfig, params, t5, enc_params_path: str, batch, peak_lr: float,
                   warmup: int):
  """(pmap'd official step, replicated state, replicated encoder params, device batch) at our network's dims."""
  oc = official_config(mods["config"], config, batch["ids"].shape[1], peak_lr)
  net = mods["model"].ELF(
      text_encoder_dim=mc.latent_dim, max_length=oc.max_length, hidden_size=mc.hidden_size, depth=mc.depth,
      num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio, attn_drop=oc.attn_dropout, proj_drop=oc.proj_dropout,
      bottleneck_dim=mc.bottleneck_dim, num_time_tokens=mc.num_time_tokens,
      num_self_cond_cfg_tokens=mc.num_guidance_tokens, num_model_mode_tokens=mc.num_mode_tokens,
      vocab_size=mc.vocab_size)
  expected = jax.eval_shape(lambda: net.init(
      jax.random.key(0), x=jnp.ones((1, oc.max_length, 2 * mc.latent_dim)), t=jnp.ones((1,)), deterministic=True,
      self_cond_cfg_scale=jnp.ones((1,)))["params"])
  published = getattr(elf_lib, "unstack_blocks", lambda p: p)(params)  # docs/method.md#checkpoint-names
  shape_of = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if shape_of(expected) != shape_of(published):
    raise SystemExit("our parameter tree does not match the official network at these dims (names or shapes): "
                     f"official {shape_of(expected)} vs ours {shape_of(published)}")
  tu = mods["train_utils"]
  schedule = tu.create_learning_rate_fn(SCHEDULE_STEPS, warmup, peak_lr, oc.lr_schedule, oc.min_lr)
  params = jax.tree.map(jnp.array, published)
  state = tu.TrainState.create(apply_fn=net.apply, params=params, tx=tu.get_optimizer(oc, schedule),
                               dropout_rng=jax.random.PRNGKey(config.seed), ema_params1=jax.tree.map(jnp.copy, params))
  with open(enc_params_path, "rb") as fh:
    enc_params = pickle.load(fh)["params"]
  step = mods["step"].train_step

  def official_step(state, encoder_params, batch):
    return step(state, encoder_params, t5.apply, batch, oc)

  cond = jnp.asarray(batch["cond_mask"], bool)
  enc_mask, attention_mask, cond_seq_mask = mods["encoder_utils"].build_self_attn_cond_masks(
      cond, jnp.asarray(batch["valid"], bool))
  official_batch = dict(input_ids=batch["ids"].astype(jnp.int32), encoder_attention_mask=enc_mask,
                        attention_mask=attention_mask, cond_seq_mask=cond_seq_mask,
                        label_drop_mask=jnp.zeros((cond.shape[0],), bool))
  replicate = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)  # one device, as jax_utils.replicate
  pmapped = jax.pmap(official_step, axis_name="batch", donate_argnums=(0,))
  return pmapped, replicate(state), replicate(enc_params), replicate(official_batch)


# ----------------------------------------------------------------------------------------------------------------
# FLOP formula.


def forward_flops(mc: ModelConfig, seq_len: int, decode: bool) -> float:
  """FLOPs of one forward pass of the flow transformer for one example of S = seq_len tokens (module docstring)."""
  c, h, m, bn = mc.latent_dim, mc.hidden_size, mc.swiglu_hidden, mc.bottleneck_dim
  length = seq_len + mc.num_prefix
  embed = 2 * (2 * c * c + c * bn + bn * h) * seq_len
  block = 2 * (4 * h * h + 3 * h * m) * length + 4 * length * length * h
  head = 2 * (h * c + c * mc.vocab_size) if decode else 2 * h * c
  return embed + mc.depth * block + head * seq_len


def step_formula_flops(mc: ModelConfig, seq_len: int, batch: int, no_grad_passes: float, decode: bool) -> float:
  """Formula FLOPs of one step whose every group is decoding (`decode`) or denoising (`no_grad_passes` full-batch
  forwards + a forward/backward, i.e. 3 forwards)."""
  if decode:
    return batch * 3 * forward_flops(mc, seq_len, True)
  return batch * (no_grad_passes + 3) * forward_flops(mc, seq_len, False)


# ----------------------------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Variant:
  """A compiled step with its state and inputs; `decodes(metrics)` says whether the step was a decoding step."""
  step: Callable
  force: Callable  # (state, key index, decode) -> state whose next step draws that coin
  state: Any
  frozen: Any
  batch: Any
  decodes: Callable
  no_grad_passes: float
  model_config: ModelConfig
  xla_flops: float
  memory: Any
  times: list = dataclasses.field(default_factory=list)  # (round, seconds, decoded) per timed step
  first_loss: float = float("nan")


def _compile(fn, *args):
  """(compiled step, XLA FLOPs, memory analysis) of `fn` (a jax.jit or jax.pmap) at `args`."""
  compiled = fn.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  try:
    mem = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):
    mem = None
  return compiled, (cost or {}).get("flops", float("nan")), mem


def choose_key(base, coin_fns, decode: bool, what: str):
  """The first fold_in(base, j) for which every coin function gives `decode` (a few tries at p = 0.1)."""
  for j in range(100_000):
    key = jax.random.fold_in(base, j)
    if all(bool(np.all(np.asarray(fn(key)) == decode)) for fn in coin_fns):
      return key
  raise SystemExit(f"no key draws decode={decode} for {what}: is flow.decoder_prob 0 or 1?")


def ours_coin_fns(batch_size, seq_len, fc: flow.FlowConfig, groups: int):
  """The decoder coins (G,) that our step draws from state key k: the step splits k and draws its noise from the
  second half, directly or (with in-step gradient accumulation) for micro-batch 0 from fold_in(·, 0); a key is
  accepted only when both agree, so either version of the step draws the wanted coin."""
  coins = lambda r: L.draw_noise(r, batch_size, seq_len, 1, fc, groups)["group_decode"]
  return [jax.jit(lambda k: coins(jax.random.split(k)[1])),
          jax.jit(lambda k: coins(jax.random.fold_in(jax.random.split(k)[1], 0)))]


def official_coin_fn(decoder_prob: float):
  """The decoder coin the official step draws from its `dropout_rng` k on device 0 (its key splits, recomputed)."""
  return jax.jit(lambda k: jax.random.bernoulli(
      jax.random.split(jax.random.fold_in(jax.random.split(k)[1], 0), 9)[5], decoder_prob))


def _run(v: Variant, index: int, decode: bool) -> float:
  v.state = v.force(v.state, index, decode)
  start = time.perf_counter()
  v.state, metrics = v.step(v.state, v.frozen, v.batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  if np.isnan(v.first_loss):
    v.first_loss = float(np.ravel(metrics["loss"])[0])
  if v.decodes(metrics) != decode:
    raise SystemExit(f"a step meant to {'decode' if decode else 'denoise'} did the other: the key choice no longer "
                     "matches how the step draws its decoder coin (see ours_coin_fns / official_coin_fn)")
  return seconds


def branch_medians(times, rounds: range) -> tuple[float, float]:
  """Median denoising- and decoding-step seconds over the timed steps of `rounds` (NaN where none)."""
  pick = lambda dec: [t for r, t, d in times if r in rounds and d == dec]
  med = lambda xs: statistics.median(xs) if xs else float("nan")
  return med(pick(False)), med(pick(True))


def expected_step(times, round_index: int, num_rounds: int, p: float) -> float:
  """(1 − p)·denoise + p·decode seconds of one round; a branch the round lacks takes the all-round median."""
  den, dec = branch_medians(times, range(round_index, round_index + 1))
  all_den, all_dec = branch_medians(times, range(num_rounds))
  den, dec = (all_den if np.isnan(den) else den), (all_dec if np.isnan(dec) else dec)
  if p == 0 or np.isnan(dec):
    return den
  if p == 1 or np.isnan(den):
    return dec
  return (1 - p) * den + p * dec


def profile(variants: dict[str, "Variant"], logdir: str, index: int, top: int):
  """Traces one denoising and one decoding step of each variant; prints milliseconds by instruction kind and by
  source (benchmarks/step_profile.py) and each step's costliest instructions."""
  by_kind, by_source = {}, {}
  for name, v in variants.items():
    hlo = step_profile.parse_hlo(v.step.as_text())
    for decode in (False, True):
      column = f"{name} {'decode' if decode else 'denoise'}"
      trace_dir = os.path.join(logdir, column.replace(" ", "_"))
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        seconds = _run(v, index, decode)
      times = step_profile.op_times(step_profile.latest_trace(trace_dir), hlo)
      parts = step_profile.breakdown(times, hlo)
      by_kind[column], by_source[column] = parts["kind"], parts["source"]
      print(f"\n{column}: {seconds * 1e3:.0f} ms wall (traced), {sum(times.values()):.0f} ms in "
            f"{len(times)} instructions; costliest:")
      for op, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:8.1f} ms  {op:32} {step_profile.kind(hlo[op]):26} {hlo[op]['op_name'][-90:]}")
  print()
  step_profile.print_table("by kind (summed op ms)", by_kind)
  print()
  step_profile.print_table("by source (summed op ms)", by_source)


def main():
  args = _parse_args()
  if args.profile:
    step_profile.enable_tracing()
  mods = import_official(args.reference_src) if "official" in args.variants else None
  config = _CONFIG.value
  if config.encoder.name_or_path == "t5-small":  # offline: random weights, T5-small's shapes (same encoder cost)
    config.encoder.update(T5_SMALL)
  config.encoder.name_or_path, config.encoder.measure_latent_stats = "random", False
  batch_size = args.batch or config.optim.global_batch_size
  seq_len = args.seq_len or config.data.max_length
  config.data.max_length = seq_len
  config.optim.grad_accum_steps = 1
  tmp = tempfile.TemporaryDirectory()
  if mods:
    check_optimizer_settings(config)
    config.flow.decoder_groups = 1  # the official step draws one decoder coin per step
    config.encoder.name_or_path, official_t5 = write_official_encoder(mods["t5"], config, config.model.vocab_size,
                                                                      tmp.name)

  encoder, enc_params = build_encoder(config)
  mc = ModelConfig.from_config(config)
  groups = step_lib.resolve_num_groups(config, None, batch_size)
  fc = flow.FlowConfig.from_config(config)
  warmup_updates = optim.warmup_steps(config.optim, 1000)
  optimizer = optim.make_optimizer(config.optim, optim.make_schedule(config.optim, 1000, SCHEDULE_STEPS))
  peak_lr = optim.learning_rate(config.optim, config.optim.global_batch_size)
  rng = jax.random.key(config.seed)
  ids = jax.random.randint(rng, (batch_size, seq_len), 2, min(mc.vocab_size, encoder.vocab_size))
  lengths = seq_len - (jnp.arange(batch_size) % 4) * (seq_len // 8)  # some padding, as real rows have
  valid = jnp.arange(seq_len)[None] < lengths[:, None]
  loss_mask = valid if config.flow.pad_token == "pad" else jnp.ones_like(valid)  # "eos": padding is learned
  batch = dict(ids=ids, valid=valid, cond_mask=jnp.zeros_like(valid), loss_mask=loss_mask)
  state0 = jax.jit(lambda: step_lib.init_state(ELF(mc), optimizer, rng, seq_len))()

  group_size = batch_size // groups
  ours_passes = L.self_cond_pass_rows(group_size, fc) / group_size  # the x_sc = 0 pass's share of the group
  official_passes = 3.0 if fc.self_cond_prob > 0 else 1.0
  ours_decodes = lambda m: bool(np.asarray(m["decode_fraction"]) > 0.5)
  ours_coins = ours_coin_fns(batch_size, seq_len, fc, groups)
  key_base = jax.random.key(config.seed + 1)

  def force_ours(state, index, decode):
    return state.replace(rng=choose_key(jax.random.fold_in(key_base, index), ours_coins, decode, "our step"))

  official_coins = [official_coin_fn(fc.decoder_prob)]

  def force_official(state, index, decode):
    key = choose_key(jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), index), official_coins, decode,
                     "the official step")
    return state.replace(dropout_rng=key[None])
  variants = {}
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} config={args.config} "
        f"overrides={args.overrides}", flush=True)

  def add_ours(name, vmc, vbatch):
    obj = step_lib.ElfObjective(ELF(vmc), encoder, fc, groups)
    fn = step_lib.make_train_step(obj, optimizer, config.optim)
    state = jax.tree.map(jnp.copy, state0)
    frozen = step_lib.FrozenInputs(enc_params)
    compiled, flops, mem = _compile(fn, state, frozen, vbatch)
    variants[name] = Variant(compiled, force_ours, state, frozen, vbatch, ours_decodes, ours_passes, vmc, flops, mem)

  for name in args.variants:
    start = time.perf_counter()
    if name == "ours":
      add_ours(name, mc, batch)
    elif name == "cached":
      add_ours(name, mc, dict(batch, latents=jax.jit(encoder.encode_raw)(enc_params, batch["ids"], valid)))
    elif name in ("scan", "unrolled"):
      add_ours(name, dataclasses.replace(mc, block_loop=name), batch)
    else:
      fn, state, frozen, obatch = build_official(mods, config, mc, jax.device_get(state0.params), official_t5,
                                                 config.encoder.name_or_path, batch, peak_lr, warmup_updates)
      compiled, flops, mem = _compile(fn, state, frozen, obatch)
      variants[name] = Variant(compiled, force_official, state, frozen, obatch,
                               lambda m: bool(np.ravel(m["ce_loss"])[0] > 0), official_passes, mc, flops, mem)
    print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
  if args.remat:
    for policy in ("full", "dots_saveable"):
      add_ours(f"remat={policy}", dataclasses.replace(mc, remat=policy), batch)

  print(f"model: depth={mc.depth} H={mc.hidden_size} heads={mc.num_heads} C={mc.latent_dim} V={mc.vocab_size} "
        f"params={count_params(state0.params) / 1e6:.2f}M dtype={mc.compute_dtype} remat={mc.remat}; "
        f"encoder: random T5 {config.encoder.random_num_layers} layers; optimizer={config.optim.optimizer} "
        f"(clip {config.optim.grad_clip}, peak lr {peak_lr:g}, warm-up {warmup_updates} updates)")
  print(f"batch={batch_size} seq_len={seq_len} tokens/step={batch_size * seq_len} coin groups={groups} "
        f"decoder_prob={fc.decoder_prob}; {args.rounds} rounds x {args.steps} timed steps per variant after "
        f"{args.warmup} warm-up, variants alternating (order flipped every round)", flush=True)

  num_decode = min(args.steps - 1, max(1, round(fc.decoder_prob * args.steps))) if 0 < fc.decoder_prob < 1 \
      else args.steps * int(fc.decoder_prob == 1)  # both branches in every round of >= 2 steps
  round_coins = np.random.default_rng(config.seed).permutation([True] * num_decode
                                                               + [False] * (args.steps - num_decode))
  for v in variants.values():
    for i in range(args.warmup):
      _run(v, i, bool(i % 2))
  names = list(variants)
  for r in range(args.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for name in order:
      v = variants[name]
      for i, decode in enumerate(round_coins):
        index = args.warmup + r * args.steps + i
        v.times.append((r, _run(v, index, bool(decode)), bool(decode)))
    print(f"round {r}: " + ", ".join(
        f"{n} {statistics.median(t for rr, t, _ in variants[n].times if rr == r) * 1e3:.1f} ms" for n in order)
          + f" (median step; {num_decode} of {args.steps} steps decoding)", flush=True)

  p = fc.decoder_prob
  expected = {n: [expected_step(v.times, r, args.rounds, p) for r in range(args.rounds)] for n, v in variants.items()}
  base = names[0]
  print("first-step loss: " + ", ".join(f"{n} {v.first_loss:.5f}" for n, v in variants.items())
        + " (each variant draws its own noise)")
  header = (f"{'variant':16} {'denoise ms':>10} {'decode ms':>10} {'expected ms':>11} {'tokens/s':>9} "
            f"{'t / t_' + base:>10} {'XLA GFLOP':>10} {'formula GFLOP':>13} {'MFU %':>6} {'temp MiB':>9} "
            f"{'args+out MiB':>12}")
  print(header)
  print("-" * len(header))
  for name, v in variants.items():
    den, dec = branch_medians(v.times, range(args.rounds))
    sec = statistics.median(expected[name])
    ratio = statistics.median(e / b for e, b in zip(expected[name], expected[base]))
    formula = ((1 - p) * step_formula_flops(v.model_config, seq_len, batch_size, v.no_grad_passes, False)
               + p * step_formula_flops(v.model_config, seq_len, batch_size, v.no_grad_passes, True))
    mfu = formula / sec / (args.peak_tflops * 1e12) if args.peak_tflops > 0 else float("nan")
    mem = v.memory
    temp = mem.temp_size_in_bytes / 2**20 if mem else float("nan")
    io = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20 if mem \
        else float("nan")
    print(f"{name:16} {den * 1e3:10.1f} {dec * 1e3:10.1f} {sec * 1e3:11.1f} {batch_size * seq_len / sec:9.0f} "
          f"{ratio:9.2f}x {v.xla_flops / 1e9:10.3f} {formula / 1e9:13.3f} {mfu * 100:6.1f} {temp:9.1f} {io:12.1f}",
          flush=True)
  for name in (n for n in variants if n != "official" and "official" in variants):
    ratios = [o / u for o, u in zip(expected["official"], expected[name])]
    per_round = lambda b: [branch_medians(variants["official"].times, range(r, r + 1))[b]
                           / branch_medians(variants[name].times, range(r, r + 1))[b] for r in range(args.rounds)]
    den_ratios, dec_ratios = per_round(0), per_round(1)
    print(f"{name} vs official train_step: {statistics.median(ratios):.2f}x throughput (median of per-round "
          f"expected-step ratios: {', '.join(f'{x:.2f}' for x in ratios)}); denoising steps "
          f"{np.nanmedian(den_ratios):.2f}x ({', '.join(f'{x:.2f}' for x in den_ratios)}); decoding steps "
          f"{np.nanmedian(dec_ratios):.2f}x ({', '.join(f'{x:.2f}' for x in dec_ratios)})")
  if args.profile:
    profile(variants, args.profile, args.warmup + args.rounds * args.steps, args.profile_top)
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    print(f"device memory high-water mark over the run: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
  print(f"host peak RSS of the whole process (all variants): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
  print("XLA GFLOP: cost_analysis() of the compiled step (encoder + optimizer included; lax.cond counted as its "
        "costlier branch). formula: flow transformer only, at the decoder probability p.")
  tmp.cleanup()


if __name__ == "__main__":
  main()
