"""Gen. PPL / entropy against a plain PyTorch re-statement of the protocol (empty samples dropped); BLEU (effective
order), ROUGE, MAUVE wrappers; what `generate.score` scores and which texts are the references."""
import collections
import json
import math
import sys
import types

import jax
import numpy as np
import pytest
from rouge_score import rouge_scorer
import sacrebleu
import torch

from elf_jax.config import base_config
from elf_jax.data import sources
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.eval import gen_ppl
from elf_jax.eval import gpt2
from elf_jax.eval import text_metrics
from elf_jax.run import generate
from elf_jax.sampling.files import Samples
from test_gpt2 import build_tiny_gpt2, EOS  # tests/ is on sys.path (pytest rootdir-relative import)

MAX_LENGTH = 24
TEXTS = [
    "",
    " \n ",  # whitespace only: empty too
    "The fox.",
    "The quick brown fox jumps over the lazy dog.",
    f"A flow{EOS} of words{EOS} embedded.",  # EOS inside the text: only the first counts
    f"{EOS}Perplexity measures surprise.",  # first EOS at position 0 (context only): the appended one is a later one
    "Numbers like 1024 and 3.14 appear too; so do commas, colons: and dashes - here. " * 3,  # > MAX_LENGTH
    "Unseen bytes: é, ß, 漢字 ✓",
]


def reference_scores(model, tokenizer, texts, max_length):
  """The §8 protocol written plainly: empty samples dropped, then one text at a time, unpadded, in PyTorch."""
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
def tiny_gpt2(tmp_path_factory):
  return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


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


HYPS = ["The cat sat on the mat.", "Running dogs were barking loudly", "A completely unrelated sentence here"]
REFS = ["the cat sat on the red mat .", "the dog runs and barks loudly", "Something else entirely, really."]


def test_bleu_is_lowercased_sacrebleu_with_effective_order():
  want = sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True, use_effective_order=True).score
  assert text_metrics.bleu(HYPS, REFS) == pytest.approx(want, rel=1e-12)
  # Effective order: a corpus without 4-grams is scored on the orders it has (plain BLEU would be 0).
  assert text_metrics.bleu(["the Cat", "a dog"], ["the cat", "a dog"]) == pytest.approx(100.0)
  lowered = sacrebleu.corpus_bleu([h.lower() for h in HYPS], [[r.lower() for r in REFS]]).score
  assert text_metrics.bleu(HYPS, REFS) == pytest.approx(lowered, rel=1e-12)
  assert text_metrics.bleu(["The Same Words Here Now"], ["the same words here now"]) == pytest.approx(100.0)
  with pytest.raises(ValueError, match="paired by index"):
    text_metrics.bleu(HYPS, REFS[:2])


def test_rouge_is_stemmed_fmeasure_mean():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  per_example = [scorer.score(r, h) for h, r in zip(HYPS, REFS)]
  got = text_metrics.rouge(HYPS, REFS)
  for key in ("rouge1", "rouge2", "rougeL"):
    assert got[key] == pytest.approx(100 * np.mean([s[key].fmeasure for s in per_example]), rel=1e-12)
  assert text_metrics.rouge(["dogs running"], ["dog runs"])["rouge1"] == pytest.approx(100.0)  # stemming on


def test_mauve_absent_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "mauve", None)
  with pytest.raises(ImportError, match="pip install mauve-text"):
    text_metrics.mauve_score(["a"], ["b"])


def test_score_drops_empty_samples():
  """`generate.score` with the synthetic language's exact figures skips empty samples and reports how many (the
  GPT-2 scorer does the same itself, above)."""
  config = base_config()
  config.data.synthetic_num_sentences = 50
  language = sources.make_language(config.data)
  setup = types.SimpleNamespace(config=config, language=language, mesh=None)
  sentences = generate.held_out_texts(setup, 6)
  got = generate.score(setup, Samples(texts=["", sentences[0], "  ", sentences[1], "the the"]))
  exact = language.gen_ppl_and_entropy([sentences[0], sentences[1], "the the"])
  assert got["num_empty"] == 2
  for key in ("gen_ppl", "entropy", "ungrammatical_fraction"):
    assert got[key] == pytest.approx(exact[key], rel=1e-12), key


def test_references_are_the_raw_target_text(tmp_path):
  """BLEU / ROUGE references: the evaluation split's target text as stored (case, punctuation and words the
  tokenizer does not know kept), not a decoding of target ids; pre-tokenized targets are decoded."""
  outputs = ["The Cat sat, on the mat!", "  a  dog\tbarks ", [5, 4, 1]]
  with open(tmp_path / "validation.jsonl", "w", encoding="utf-8") as f:
    for i, output in enumerate(outputs):
      f.write(json.dumps({"input": f"document {i}", "output": output}) + "\n")
  config = base_config()
  config.data.source, config.data.path, config.data.conditional = "jsonl", str(tmp_path / "{split}.jsonl"), True
  config.data.eval_split = "validation"
  tokenizer = tokenizer_lib.build_word_tokenizer(["the", "cat", "sat", "on", "mat"])
  setup = types.SimpleNamespace(config=config, language=None, tokenizer=tokenizer)
  assert generate.held_out_texts(setup, 10, field="output") == outputs[:2] + ["sat cat"]
  assert generate.held_out_texts(setup, 1, field="input") == ["document 0"]
