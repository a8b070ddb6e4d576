"""Gen. PPL / entropy against a plain PyTorch re-statement of the protocol (empty samples dropped), on the tiny GPT-2
of tests/eval/conftest.py; the MAUVE features against mauve's own featurizer."""
import collections
import math

import jax
import numpy as np
import pytest
import torch

from elf_jax.eval import gen_ppl, gpt2

from tests.eval.conftest import MAX_LENGTH, TEXTS


def reference_scores(model, tokenizer, texts, max_length):
  """The docs/method.md#evaluation protocol written plainly: empty samples dropped, then one text at a time, unpadded,
  in PyTorch."""
  eos = tokenizer.eos_token_id
  nll_sum, num_tokens, entropies = 0.0, 0, []
  kept = [t for t in texts if t.strip()]
  for text in kept:
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_length]
    counts = collections.Counter(ids)
    entropies.append(-sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values()))
    seq = (ids + [eos])[:max_length]
    with torch.no_grad():
      logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
    eos_seen = 0
    for t, token in enumerate(seq):
      eos_seen += token == eos
      if t >= 1 and (token != eos or eos_seen == 1):
        nll_sum -= float(logp[t - 1, token])
        num_tokens += 1
  nll = nll_sum / num_tokens
  return {"gen_ppl": math.exp(nll), "entropy": sum(entropies) / len(entropies), "nll": nll,
          "num_tokens": num_tokens, "num_samples": len(kept), "num_empty": len(texts) - len(kept)}


@pytest.fixture(scope="module")
def gpt2_and_reference(tiny_gpt2):
  config, params = gpt2.load_hf_gpt2(str(tiny_gpt2.directory))
  want = reference_scores(tiny_gpt2.torch_model, tiny_gpt2.tokenizer, TEXTS, MAX_LENGTH)
  return config, params, want


def test_texts_exercise_truncation_and_eos(tiny_gpt2):
  lengths = [len(tiny_gpt2.tokenizer.encode(t)) for t in TEXTS]
  assert lengths[0] == 0 and lengths[1] > 0 and max(lengths) > MAX_LENGTH
  assert tiny_gpt2.tokenizer.encode(TEXTS[4]).count(tiny_gpt2.tokenizer.eos_token_id) == 2


def test_gen_ppl_and_entropy_match_pytorch(tiny_gpt2, gpt2_and_reference):
  config, params, want = gpt2_and_reference
  scorer = gen_ppl.GenPPLScorer(config, params, tiny_gpt2.tokenizer, batch_size=3, max_length=MAX_LENGTH,
                                min_bucket=8)
  got = scorer.score(TEXTS)
  for key in ("num_tokens", "num_samples", "num_empty"):
    assert got[key] == want[key], key
  assert (got["num_empty"], got["num_samples"]) == (2, len(TEXTS) - 2)
  for key in ("gen_ppl", "entropy", "nll"):
    assert got[key] == pytest.approx(want[key], rel=1e-4), key
  assert got["gen_ppl"] == pytest.approx(math.exp(got["nll"]), rel=1e-12)
  # Empty samples change nothing but the count; all empty: nothing to score.
  assert scorer.score([t for t in TEXTS if t.strip()])["nll"] == pytest.approx(got["nll"], rel=1e-12)
  nothing = scorer.score(["", "  "])
  assert nothing["num_empty"] == 2 and nothing["num_samples"] == 0 and math.isnan(nothing["gen_ppl"])


@pytest.mark.parametrize("mesh_kind", ["auto", "explicit"])
def test_sharded_scoring_equals_unsharded(tiny_gpt2, gpt2_and_reference, mesh_kind):
  config, params, _ = gpt2_and_reference
  if mesh_kind == "auto":
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
  else:  # jax.make_mesh gives Explicit axes; a second axis holds nothing of the batch
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  kwargs = {"batch_size": 8, "max_length": MAX_LENGTH, "min_bucket": 8}
  sharded = gen_ppl.GenPPLScorer(config, params, tiny_gpt2.tokenizer, mesh=mesh, **kwargs).score(TEXTS)
  plain = gen_ppl.GenPPLScorer(config, params, tiny_gpt2.tokenizer, **kwargs).score(TEXTS)
  assert sharded["num_tokens"] == plain["num_tokens"]
  for key in ("gen_ppl", "entropy", "nll"):
    assert sharded[key] == pytest.approx(plain[key], rel=1e-6), key
  with pytest.raises(ValueError, match=r"not a multiple of the mesh's \d batch shards"):
    gen_ppl.GenPPLScorer(config, params, tiny_gpt2.tokenizer, mesh=mesh, batch_size=3, max_length=MAX_LENGTH)


def test_from_pretrained_loads_weights_and_tokenizer(tiny_gpt2, gpt2_and_reference):
  _, _, want = gpt2_and_reference
  scorer = gen_ppl.GenPPLScorer.from_pretrained(str(tiny_gpt2.directory), batch_size=4, max_length=MAX_LENGTH)
  assert scorer.score(TEXTS)["nll"] == pytest.approx(want["nll"], rel=1e-4)


def test_counted_predictions_tell_padding_from_eos():
  e = 0
  ids = np.array([[5, 6, e, e, e],  # text "5 6" + appended EOS (length 3) + padding
                  [5, 6, 7, 8, e],  # truncated sample without EOS (length 4) + one padding EOS
                  [e, 5, e, 6, e]])  # EOS at position 0 is the first one; the one at 2 is a later one
  got = gen_ppl.counted_predictions(ids, np.array([3, 4, 5]), eos_id=e)
  np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0]])


def test_scored_sequence_and_buckets():
  assert gen_ppl.scored_sequence([1, 2], eos_id=0, max_length=4) == [1, 2, 0]
  assert gen_ppl.scored_sequence([1, 2, 3, 4], eos_id=0, max_length=4) == [1, 2, 3, 4]
  assert [gen_ppl.bucket_length(n, 1024) for n in (1, 16, 17, 600, 1024)] == [16, 16, 32, 1024, 1024]
  assert gen_ppl.bucket_length(70, 100) == 100


def test_unigram_entropy_by_hand():
  assert gen_ppl.unigram_entropy([7, 7, 3, 9]) == pytest.approx(1.5 * math.log(2), rel=1e-12)
  assert gen_ppl.unigram_entropy(list(range(10))) == pytest.approx(math.log(10), rel=1e-12)
  assert gen_ppl.unigram_entropy([4, 4, 4]) == 0.0
  assert gen_ppl.unigram_entropy([]) == 0.0


def test_mauve_features_equal_mauves_featurizer(tiny_gpt2):
  """Our features (Flax GPT-2, padded batches sorted by length) = mauve's own `featurize_tokens_from_model` on the
  PyTorch model (its `get_model` only loads hub names containing "gpt2", so the featurizer is called directly)."""
  from mauve import utils as mauve_utils  # pylint: disable=import-outside-toplevel
  scorer = gen_ppl.GenPPLScorer.from_pretrained(str(tiny_gpt2.directory), batch_size=3, min_bucket=8)
  ids = scorer.token_ids(gen_ppl.nonempty(TEXTS))
  assert scorer.max_length == 64 and max(map(len, ids)) == 64  # n_positions caps it; the long text is cut
  want = mauve_utils.featurize_tokens_from_model(tiny_gpt2.torch_model, [torch.tensor([x]) for x in ids],
                                                 batch_size=2).numpy()
  got = scorer.features(ids)
  assert got.shape == (len(ids), 32)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="1 to 64 ids per text"):
    scorer.features([[]])
