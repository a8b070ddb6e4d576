"""Samples of an experiment's network: draw and decode them (`generate`), the held-out data they are compared with,
and their scores.

Multi-host: every process runs the same sampling over the whole mesh (the batch split over data × fsdp) and holds
every decoded sample, so the scores are the same on every process.
"""
import dataclasses
import functools
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from elf_jax import fs
from elf_jax.data import pipeline, sources
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.eval import scoring, text_metrics
from elf_jax.parallel.mesh import num_batch_shards
from elf_jax.run import experiment
from elf_jax.sampling import sampler, trajectory
from elf_jax.sampling.files import Samples


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `generate` draws: the decoded samples and, when the sampler keeps trajectories, the SampleOutput of the
  first batch (numpy, every process) with its condition mask (B, S) (conditional tasks, else None)."""
  samples: Samples
  first_batch: sampler.SampleOutput | None = None
  first_cond_mask: np.ndarray | None = None
  candidates: tuple[Samples, ...] = ()  # MBR: the further draws for the same conditions (generate's `candidates`)


@dataclasses.dataclass(frozen=True)
class Scored:
  """What `generate_and_score` returns: the samples, their scores (with mbr_* under MBR) and the MBR choices."""
  samples: Samples
  metrics: dict[str, float]
  mbr_samples: Samples | None = None


def decode(exp: experiment.Experiment, ids) -> list[str]:
  """Token-id rows → texts with the experiment's tokenizer (special tokens skipped, as decoded: no strip), spaces
  cleaned up as config.data.clean_up_tokenization_spaces says."""
  return tokenizer_lib.decode(exp.tokenizer, ids,
                              clean_up_tokenization_spaces=exp.config.data.clean_up_tokenization_spaces)


@functools.lru_cache(maxsize=32)
def compiled_sampler(model, sample_config: sampler.SampleConfig, mesh):
  """`sampler.make_sampler`, made once per (network, settings, mesh): repeated calls reuse its compilations."""
  return sampler.make_sampler(model, sample_config, mesh)


@functools.lru_cache(maxsize=8)
def compiled_encoder(encoder):
  """The jitted `encoder.encode(params, ids, valid, cond_mask)`, made once per encoder."""
  return jax.jit(encoder.encode)


def sampling_batch(num_samples: int, batch_size: int, shards: int) -> int:
  """Rows per sampler call: `batch_size` (cut to a multiple of the mesh's batch `shards`), or for fewer samples the
  smallest power-of-two multiple of `shards` that holds them, so that a few inputs do not pay for a whole batch and
  at most log2(batch_size) shapes are ever compiled. A row's draw does not depend on the batch (jax's partitionable
  threefry keys each noise element by its index)."""
  full = max(shards, batch_size // shards * shards)
  return min(full, shards << (math.ceil(num_samples / shards) - 1).bit_length())


def generate(exp: experiment.Experiment, params, num_samples: int, seed: int,
             sample_config: sampler.SampleConfig | None = None,
             conditions: dict[str, np.ndarray] | None = None, candidates: int = 1, *, eval_references: bool = True,
             progress: bool = False) -> Generation:
  """Draws `num_samples` samples (in batches of `sampling_batch` rows, the last one cut) and decodes them.

  conditions: the batch-major `ids`, `valid`, `cond_mask` (N, S) of N rows whose condition positions (`cond_mask`)
  are encoded and kept clean (their other positions are ignored); at most N samples are drawn, one per row. For
  conditional tasks, the first N examples of the evaluation split (`eval_conditions`), or the user's own inputs;
  for unconditional models, the user's prefixes (positions known from the start, their continuation sampled).
  candidates: k >= 1 draws per condition (MBR), with one compiled sampler: the first is the plain draw of `seed`
  (`Generation.samples`, the same as with k = 1), the others (`Generation.candidates`) come from key streams of
  their own.
  eval_references: attach the evaluation split's reference texts to the samples (conditions from `eval_conditions`).
  progress: show a progress bar over the batches.
  """
  config, mesh = exp.config, exp.mesh
  roots = [jax.random.PRNGKey(seed)]
  roots += [jax.random.fold_in(jax.random.split(roots[0])[1], c) for c in range(1, candidates)]
  if conditions is not None:
    num_samples = min(num_samples, len(conditions["ids"]))
  sc = sample_config or exp.sample_config()
  sample_fn = compiled_sampler(exp.model, sc, mesh)
  shards = num_batch_shards(mesh)
  batch = sampling_batch(num_samples, config.sample.batch_size, shards)
  encode = compiled_encoder(exp.encoder)
  texts, ids_out, first = [[] for _ in roots], [[] for _ in roots], None
  for b in tqdm.trange(math.ceil(num_samples / batch), desc="sampling", unit="batch", disable=not progress):
    cond = None
    if conditions is not None:
      part = {k: _take_rows(v, b * batch, batch) for k, v in conditions.items()}
      latents = encode(exp.encoder_params, part["ids"], part["valid"], part["cond_mask"])
      cond = sampler.PinnedLatents(latents=jnp.where(part["cond_mask"][..., None], latents, 0.0),
                                   mask=jnp.asarray(part["cond_mask"]))
    for c, root in enumerate(roots):
      out = sampler.sample_from_seed(sample_fn, params, jax.random.fold_in(root, b), sc, batch=batch,
                                     seq_len=config.data.max_length, latent_dim=exp.encoder.dim, mesh=mesh,
                                     condition=cond)
      if b == 0 and c == 0 and sc.return_trajectory:  # on every process, as numpy (the batch may span processes)
        first = (multihost_utils.process_allgather(out, tiled=True), None if cond is None else np.asarray(cond.mask))
      ids = multihost_utils.process_allgather(out.ids, tiled=True)
      ids_out[c].extend(ids.tolist())
      texts[c].extend(decode(exp, ids))
  drawn = [Samples(texts=t[:num_samples], ids=i[:num_samples]) for t, i in zip(texts, ids_out)]
  if conditions is not None:
    ids, cm = conditions["ids"][:num_samples], conditions["cond_mask"][:num_samples]
    pairs = {"conditions": decode(exp, np.where(cm, ids, exp.tokenizer.pad_token_id)),
             "references": held_out_texts(exp, num_samples, field="output") if eval_references else None}
    drawn = [dataclasses.replace(d, **pairs) for d in drawn]
  return Generation(drawn[0], *(first or (None, None)), candidates=tuple(drawn[1:]))


def render_first_batch(exp: experiment.Experiment, params, result: Generation, out_dir: str,
                       sc: sampler.SampleConfig, max_examples: int) -> dict[str, str]:
  """Writes the denoising trajectory of the first `max_examples` samples of `result` (drawn with
  `sc.return_trajectory`) to out_dir/trajectory.{jsonl,html,png}; returns the paths."""
  out, cond_mask = result.first_batch, result.first_cond_mask
  n = min(max_examples, out.ids.shape[0])
  out = out._replace(latents=out.latents[:n], ids=out.ids[:n], raw_ids=out.raw_ids[:n],
                     trajectory=out.trajectory[:, :n], trajectory_t=out.trajectory_t[:, :n])
  return trajectory.render_trajectory(
      fs.path(out_dir), params, exp.model, out, exp.tokenizer, guidance_scale=sc.guidance_scale,
      cond_mask=None if cond_mask is None else cond_mask[:n], eos_id=sc.eos_id, pad_id=sc.pad_id, png=True,
      max_target_length=sc.max_target_length)


def _take_rows(x: np.ndarray, start: int, n: int) -> np.ndarray:
  """Rows [start, start + n) of x, wrapping around so that the last batch is full."""
  return x[np.arange(start, start + n) % len(x)]


def eval_conditions(exp: experiment.Experiment, num: int) -> dict[str, np.ndarray] | None:
  """The first `num` examples of the evaluation split (conditional tasks), unshuffled; None if unconditional."""
  config = exp.config
  if not config.data.conditional:
    return None
  ds = pipeline.make_dataset(config, exp.tokenizer, config.data.eval_split, language=exp.language, shuffle=False,
                             num_epochs=1, drop_remainder=False, batch_size=config.sample.batch_size)
  rows: dict[str, list] = {}
  for batch in ds:
    for k, v in batch.items():
      rows.setdefault(k, []).append(v)
    if sum(len(v) for v in rows["ids"]) >= num:
      break
  return {k: np.concatenate(v)[:num] for k, v in rows.items()}


def held_out_texts(exp: experiment.Experiment, num: int, field: str = "text") -> list[str]:
  """The raw `field` ("text"; conditional: "input" / "output") of the first `num` records of the evaluation split.

  Text fields are returned as stored (the references of BLEU / ROUGE are the dataset's target text, as in the
  official evaluation, not a re-decoding of truncated target ids): "output" is the raw target text column
  (config.data.reference_key) where the dataset has one, else the output field; pre-tokenized fields are decoded
  (`decode`).
  """
  source = sources.make_source(exp.config.data, exp.config.data.eval_split, exp.language)
  records = [source[i] for i in range(min(num, len(source)))]
  values = [r["reference"] if field == "output" and "reference" in r else r[field] for r in records]
  return [v if isinstance(v, str) else decode(exp, [v])[0] for v in values]


def score(exp: experiment.Experiment, samples: Samples) -> dict[str, float]:
  """`elf_jax.eval.scoring.score` of `samples` with this experiment's data: references (conditional), the synthetic
  language and as many held-out true sentences, or GPT-2 over the mesh (with as many held-out texts for MAUVE)."""
  config = exp.config
  needs_held_out = not config.data.conditional and (exp.language is not None or config.eval.mauve)
  true_texts = held_out_texts(exp, len(samples.texts)) if needs_held_out else None
  return scoring.score(samples.texts, config, references=samples.references, language=exp.language,
                       true_texts=true_texts, mesh=exp.mesh)


def generate_and_score(exp: experiment.Experiment, params, num_samples: int, seed: int,
                       sample_config: sampler.SampleConfig | None = None,
                       conditions: dict[str, np.ndarray] | None = None) -> Scored:
  """`generate` then `score`. Conditional tasks with eval.mbr_candidates = k > 1 draw k candidates per condition
  (`generate(..., candidates=k)`), keep each condition's MBR choice (`text_metrics.mbr_select` by
  eval.mbr_metric) and add its scores as mbr_<name> beside the scores of the first, single sample."""
  k = exp.config.eval.mbr_candidates if conditions is not None else 1
  drawn = generate(exp, params, num_samples, seed, sample_config, conditions, candidates=k)
  samples = drawn.samples
  metrics = score(exp, samples)
  if k == 1:
    return Scored(samples, metrics)
  candidates = (samples,) + drawn.candidates
  chosen = text_metrics.mbr_select(list(zip(*(c.texts for c in candidates))), exp.config.eval.mbr_metric)
  mbr = dataclasses.replace(samples, texts=[candidates[c].texts[i] for i, c in enumerate(chosen)],
                            ids=[candidates[c].ids[i] for i, c in enumerate(chosen)])
  return Scored(samples, {**metrics, **{f"mbr_{name}": v for name, v in score(exp, mbr).items()}}, mbr)
