"""Generative perplexity and unigram entropy of sample texts under a GPT-2 scorer (docs/method.md#evaluation).

`GenPPLScorer` is the entry point. The protocol step by step (empty samples, EOS, which predictions count) and batching:
docs/evaluation.md#generative-perplexity.
"""
from collections.abc import Sequence
import math
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from elf_jax import hub
from elf_jax.eval import gpt2
from elf_jax.parallel.mesh import batch_axes, num_batch_shards


def nonempty(texts: Sequence[str]) -> list[str]:
  """The texts that are neither empty nor whitespace only, in order (those Gen. PPL and entropy score)."""
  return [t for t in texts if t.strip()]


def unigram_entropy(ids: Sequence[int] | np.ndarray) -> float:
  """Entropy (nats) of the empirical unigram distribution of a 1-D id sequence; 0.0 when empty."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size == 0:
    return 0.0
  _, counts = np.unique(ids, return_counts=True)
  p = counts / ids.size
  return float(-(p * np.log(p)).sum())


def scored_sequence(ids: Sequence[int], eos_id: int, max_length: int) -> list[int]:
  """The sequence GPT-2 scores for one sample: `(ids + [eos_id])[:max_length]`."""
  return (list(ids) + [eos_id])[:max_length]


def counted_predictions(input_ids: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
  """Which next-token predictions enter Gen. PPL.

  Args:
    input_ids: (B,T) scored sequences, right-padded (any pad id, EOS in practice).
    lengths: (B,) number of real tokens of each row.
    eos_id: the EOS token id.

  Returns:
    (B,T-1) bool; entry t is True when token t+1 is real (t+1 < length) and is not an EOS other than the first
    EOS among the row's real tokens.
  """
  positions = np.arange(input_ids.shape[1])
  real = positions[None, :] < np.asarray(lengths)[:, None]
  eos = (input_ids == eos_id) & real
  first_eos = eos & (np.cumsum(eos, axis=1) == 1)
  return (real & (~eos | first_eos))[:, 1:]


def bucket_length(length: int, max_length: int, min_bucket: int = 16) -> int:
  """Padded length for a batch whose longest row has `length` tokens: a power of two, capped at max_length."""
  return min(max_length, max(min_bucket, 1 << max(length - 1, 0).bit_length()))


class GenPPLScorer:
  """Scores sample texts: Gen. PPL and unigram entropy under a GPT-2 model (protocol in the module docstring).

  Args:
    config: GPT-2 shapes (from `gpt2.load_hf_gpt2`).
    params: GPT-2 Flax params tree (the "params" collection).
    tokenizer: a Hugging Face GPT-2 tokenizer (`AutoTokenizer.from_pretrained(dir)`); its eos_token_id is EOS.
    batch_size: rows per forward pass; a multiple of the mesh's batch shards (data × fsdp) when a mesh is given.
    mesh: optional `jax.sharding.Mesh` with a 'data' and / or 'fsdp' axis; the batch is sharded over them.
    max_length: tokens per scored sequence (at most GPT-2's context n_positions; None = n_positions).
    compute_dtype: matmul dtype of GPT-2 (float32 or bfloat16); the NLL is float32.
    min_bucket: shortest padded length.
  """

  def __init__(self, config: gpt2.GPT2Config, params: Any, tokenizer: Any, *, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, max_length: int | None = None, compute_dtype: Any = jnp.float32,
               min_bucket: int = 16):
    max_length = config.n_positions if max_length is None else max_length
    if not 2 <= max_length <= config.n_positions:
      raise ValueError(f"max_length={max_length} must be in [2, n_positions={config.n_positions}]")
    if tokenizer.eos_token_id is None:
      raise ValueError("the GPT-2 tokenizer has no eos_token_id; load the tokenizer saved with the GPT-2 weights")
    if len(tokenizer) > config.vocab_size:
      raise ValueError(f"tokenizer has {len(tokenizer)} tokens but GPT-2 vocab_size is {config.vocab_size}: "
                       "tokenizer and weights come from different models")
    self.tokenizer = tokenizer
    self.eos_id = int(tokenizer.eos_token_id)
    self.batch_size = batch_size
    self.max_length = max_length
    self.min_bucket = min_bucket
    self._model = gpt2.GPT2LMHeadModel(config, dtype=compute_dtype)
    if mesh is None:
      self._batch_sharding = None
      self._params = jax.device_put(params)
    else:
      if not batch_axes(mesh):
        raise ValueError(f"mesh axes {mesh.axis_names} have no 'data' or 'fsdp' axis to shard the batch over")
      if batch_size % num_batch_shards(mesh):
        raise ValueError(f"batch_size={batch_size} is not a multiple of the mesh's {num_batch_shards(mesh)} batch "
                         "shards (data × fsdp)")
      mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names)  # Auto axes: jit propagates shardings itself
      self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes(mesh)))
      self._params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self._row_nll = jax.jit(self._row_nll_impl)
    self._last_hidden = jax.jit(self._last_hidden_impl)

  @classmethod
  def from_pretrained(cls, name_or_path: str, **kwargs) -> "GenPPLScorer":
    """Scorer from a Hugging Face GPT-2 directory or hub id (weights and tokenizer), e.g. "gpt2-large"; max_length
    defaults to min(1024, the model's n_positions)."""
    import transformers  # pylint: disable=import-outside-toplevel
    # The scorer needs the tokenizer files (vocab.json, merges.txt, tokenizer*.json) beside config.json.
    directory = hub.resolve_dir(name_or_path, "GPT-2", ["*.json", "*.txt"], field="eval.gpt2")
    config, params = gpt2.load_hf_gpt2(str(directory))
    kwargs.setdefault("max_length", min(1024, config.n_positions))
    return cls(config, params, transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False),
               **kwargs)

  def _row_nll_impl(self, params, input_ids, attention_mask, counted):
    """(B,T) ids and mask, (B,T-1) counted -> (B,) float32 sum of counted next-token NLLs (nats) per row."""
    logits = self._model.apply({"params": params}, input_ids, attention_mask)[:, :-1]
    target_logit = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.where(counted, nll, 0.0).sum(axis=-1)

  def _last_hidden_impl(self, params, input_ids, attention_mask, lengths):
    """(B,T) ids and mask, (B,) lengths -> (B,E) float32 hidden state after the final layer norm at each row's last
    real token."""
    hidden = self._model.apply({"params": params}, input_ids, attention_mask, hidden_states=True)
    return jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]

  def _batches(self, sequences: list[list[int]]):
    """Yields (indices into sequences, (B,T) ids right-padded with EOS, (B,) lengths, (B,T) attention mask) for
    batches of `batch_size` sequences sorted longest first; rows past the last sequence have length 0."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), self.batch_size):
      indices = order[start:start + self.batch_size]
      length = bucket_length(max(len(sequences[i]) for i in indices), self.max_length, self.min_bucket)
      input_ids = np.full((self.batch_size, length), self.eos_id, np.int32)
      lengths = np.zeros(self.batch_size, np.int32)
      for r, i in enumerate(indices):
        input_ids[r, :len(sequences[i])] = sequences[i]
        lengths[r] = len(sequences[i])
      yield indices, input_ids, lengths, (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)

  def _gathered(self, fn, *batch) -> np.ndarray:
    """fn(params, *batch) over the mesh (batch sharded when a mesh is given), gathered on every process as numpy."""
    if self._batch_sharding is not None:
      batch = jax.device_put(batch, self._batch_sharding)
    return np.asarray(multihost_utils.process_allgather(fn(self._params, *batch), tiled=True))

  def features(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """MAUVE features of GPT-2 id sequences (from `token_ids`, each non-empty and at most max_length long): (N,E)
    float32, the hidden state after the final layer norm at each sequence's last token (as mauve's
    `featurize_tokens_from_model` computes them)."""
    ids = [list(x) for x in token_ids]
    if not all(0 < len(x) <= self.max_length for x in ids):
      raise ValueError(f"MAUVE features need 1 to {self.max_length} ids per text: drop empty samples first "
                       "(gen_ppl.nonempty) and truncate (token_ids)")
    out = np.zeros((len(ids), self._model.config.n_embd), np.float32)
    for indices, input_ids, lengths, attention_mask in self._batches(ids):
      out[indices] = self._gathered(self._last_hidden, input_ids, attention_mask, lengths)[:len(indices)]
    return out

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """GPT-2 ids of each text, truncated to max_length (step 1 of the protocol)."""
    encoded = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids[:self.max_length]) for ids in encoded]

  def score(self, texts: Sequence[str]) -> dict[str, float]:
    """Gen. PPL and entropy of the non-empty `texts`.

    Returns:
      dict with gen_ppl (exp of nll), entropy (mean unigram entropy, nats), nll (mean NLL per counted token,
      nats), num_tokens (counted predictions), num_samples (scored samples), num_empty (dropped samples); the
      figures are nan when every sample is empty.
    """
    if len(texts) == 0:
      raise ValueError("no texts to score")
    kept = nonempty(texts)
    if not kept:
      return {"gen_ppl": math.nan, "entropy": math.nan, "nll": math.nan, "num_tokens": 0, "num_samples": 0,
              "num_empty": len(texts)}
    ids = self.token_ids(kept)
    total_nll, num_tokens = 0.0, 0
    for _, input_ids, lengths, attention_mask in self._batches([scored_sequence(x, self.eos_id, self.max_length)
                                                                for x in ids]):
      counted = counted_predictions(input_ids, lengths, self.eos_id)
      row_nll = self._gathered(self._row_nll, input_ids, attention_mask, counted)
      total_nll += float(np.asarray(row_nll, np.float64).sum())
      num_tokens += int(counted.sum())
    if num_tokens == 0:
      raise ValueError("no predicted tokens: every sample is shorter than two GPT-2 tokens including EOS")
    nll = total_nll / num_tokens
    return {"gen_ppl": math.exp(nll), "entropy": float(np.mean([unigram_entropy(x) for x in ids])), "nll": nll,
            "num_tokens": num_tokens, "num_samples": len(kept), "num_empty": len(texts) - len(kept)}
