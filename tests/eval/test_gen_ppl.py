"""Gen. PPL / entropy against a plain PyTorch re-statement of the protocol (empty samples dropped); BLEU (effective
order), ROUGE, MAUVE wrappers; what `generate.score` scores and which texts are the references."""
import collections
import json
import math
import subprocess
import sys
import types

import jax
import numpy as np
from flax import linen as nn
import pytest
from rouge_score import rouge_scorer
import sacrebleu
import tokenizers
import torch
import transformers

from elf_jax import recipes
from elf_jax.config import base_config
from elf_jax.data import sources
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.eval import gen_ppl
from elf_jax.eval import gpt2
from elf_jax.eval import scoring
from elf_jax.eval import text_metrics
from elf_jax.model.elf import init_params
from elf_jax.run import experiment
from elf_jax.run import generate
from elf_jax.sampling.files import Samples
from tests.eval.test_gpt2 import build_tiny_gpt2, EOS

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
  with pytest.raises(ImportError, match=r"pip install 'elf_jax\[mauve\]'"):
    text_metrics.mauve(np.zeros((2, 3)), np.zeros((2, 3)))


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


def test_mauve_runs_from_features_without_torch():
  """mauve-text from features needs neither torch nor a download: run with torch made unimportable."""
  code = ("import sys\n"
          "class NoTorch:\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name.split('.')[0] == 'torch':\n"
          "      raise ImportError('torch is blocked')\n"
          "sys.meta_path.insert(0, NoTorch())\n"
          "import numpy as np\n"
          "from elf_jax.eval import text_metrics\n"
          "rng = np.random.default_rng(0)\n"
          "p, q = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))\n"
          "print(text_metrics.mauve(p, p.copy()), text_metrics.mauve(p, q + 3.0))\n"
          "assert 'torch' not in sys.modules\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
  same, shifted = map(float, out.stdout.split()[-2:])
  assert same == pytest.approx(1.0, abs=1e-6) and shifted < 0.5


def test_self_bleu_equals_sacrebleu_by_hand():
  """Each text's sentence BLEU against all the others (sacreBLEU defaults), averaged; texts with repeated n-grams, a
  duplicate (clipping against the second largest count) and tied reference lengths."""
  texts = ["The cat sat on the mat.", "The cat sat on the mat.", "the the the cat", "A dog ran, and ran, today!",
           "Dogs bark; cats sit on mats.", "one two three four five six"]
  want = np.mean([sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:]).score for i, t in enumerate(texts)])
  assert text_metrics.self_bleu(texts) == pytest.approx(want, rel=1e-12)
  assert text_metrics.self_bleu(["x y z", "x y z"]) == pytest.approx(100.0)
  assert math.isnan(text_metrics.self_bleu(["alone"]))


def test_distinct_n_by_hand():
  texts = ["a b a b", "a b c."]  # 13a tokens: a b a b | a b c .
  assert text_metrics.distinct_n(texts, 1) == pytest.approx(4 / 8)  # {a, b, c, .} of 8 tokens
  assert text_metrics.distinct_n(texts, 2) == pytest.approx(4 / 6)  # {ab, ba, bc, c.} of 3 + 3 (none across texts)
  assert text_metrics.distinct_n(texts, 4) == pytest.approx(2 / 2)
  assert math.isnan(text_metrics.distinct_n(["a"], 2))
  got = text_metrics.diversity(["", "a b a b", "  ", "a b c."])  # empty samples dropped
  assert got["distinct_1"] == pytest.approx(0.5) and set(got) == {"self_bleu"} | {f"distinct_{n}" for n in range(1, 5)}


def test_mbr_selects_the_consensus_candidate():
  """The candidate with the highest mean utility against the others is kept; ties go to the first."""
  consensus = ["the cat sat on the mat", "a dog barked at the moon tonight", "the cat sat on a mat",
               "the cat sat on the mat today"]
  by_bleu = [np.mean([sacrebleu.sentence_bleu(h, [r], lowercase=True).score for r in consensus if r is not h])
             for h in consensus]
  assert text_metrics.mbr_select([consensus], "bleu") == [int(np.argmax(by_bleu))] == [0]
  outlier_first = [consensus[1], consensus[2], consensus[3]]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  by_rouge = [np.mean([scorer.score(r, h)["rougeL"].fmeasure for r in outlier_first if r is not h])
              for h in outlier_first]
  assert text_metrics.mbr_select([outlier_first, ["same", "same"], ["only"]], "rougeL") == [
      int(np.argmax(by_rouge)), 0, 0]
  assert int(np.argmax(by_rouge)) != 0
  with pytest.raises(ValueError, match="rougeL"):
    text_metrics.mbr_select([consensus], "meteor")


@pytest.mark.slow
def test_gpt2_scores_carry_mauve_and_diversity(tiny_gpt2):
  """The GPT-2 path: Gen. PPL, diversity and length-matched MAUVE against held-out texts, each reference cut to the
  GPT-2 length of its sample; eval.mauve=False leaves MAUVE out."""
  config = base_config()
  config.data.source = "text"
  config.eval.gpt2, config.eval.batch_size = str(tiny_gpt2.directory), 4
  samples = [t for t in TEXTS if t.strip()] * 4
  references = [t + " And then some more words follow here." for t in reversed(samples)]
  got = scoring.score(samples, config, true_texts=references)
  assert set(got) >= {"gen_ppl", "entropy", "mauve", "self_bleu", "distinct_1", "distinct_4"}
  scorer = gen_ppl.GenPPLScorer.from_pretrained(str(tiny_gpt2.directory), batch_size=4)
  sample_ids, reference_ids = scorer.token_ids(samples), scorer.token_ids(references)
  want = text_metrics.mauve(scorer.features([r[:len(s)] for r, s in zip(reference_ids, sample_ids)]),
                            scorer.features(sample_ids))
  assert got["mauve"] == pytest.approx(want, rel=1e-6) and 0.0 < got["mauve"] <= 1.0
  config.eval.mauve = False
  assert "mauve" not in scoring.score(samples, config)


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
  # No GPT-2 under the synthetic language: MAUVE is absent (not nan); diversity is always there.
  assert "mauve" not in got
  assert got["self_bleu"] == pytest.approx(text_metrics.self_bleu([sentences[0], sentences[1], "the the"]))
  assert got["distinct_1"] == pytest.approx(text_metrics.distinct_n([sentences[0], sentences[1], "the the"], 1))


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


def test_references_from_the_raw_target_column(tmp_path):
  """An hf_arrow dataset laid out like the official XSum / WMT ones (target ids `input_ids`, condition ids
  `condition_input_ids`, the raw texts beside them): the references are the raw `target` text, exactly as stored;
  without that column (data.reference_key naming none) the target ids are decoded."""
  import datasets  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer_lib.build_word_tokenizer(["the", "cat", "sat", "on", "mat", "."])
  targets = ["The cat sat on the mat.", "  the Cat, sat!  "]
  datasets.Dataset.from_dict({
      "condition_input_ids": [[3, 4, 5], [6, 7]], "input_ids": [[3, 4, 5, 1, 1], [4, 5, 1]],
      "document": ["the cat sat on the mat", "on the mat"], "target": targets,
  }).save_to_disk(str(tmp_path / "validation_t5"))
  config = base_config()
  config.data.update(source="hf_arrow", path=str(tmp_path / "{split}_t5"), conditional=True, eval_split="validation",
                     input_key="condition_input_ids", output_key="input_ids")
  setup = types.SimpleNamespace(config=config, language=None, tokenizer=tokenizer)
  assert generate.held_out_texts(setup, 10, field="output") == targets
  assert generate.held_out_texts(setup, 1, field="input") == ["the cat sat"]
  config.data.reference_key = "summary"  # no such column: the ids, decoded
  assert generate.held_out_texts(setup, 10, field="output") == ["the cat sat", "cat sat"]


def test_decoding_cleans_up_spaces_as_the_official_environment():
  """transformers < 4.45 (the official environment) cleaned up tokenization spaces when decoding T5 ids (its default;
  t5-small sets nothing); transformers 5 does not. data.clean_up_tokenization_spaces (default True) is passed
  explicitly, so the same ids give the official text under either version. Texts are kept as decoded (no strip)."""
  words = ["John", "'s", "hat", "is", "n't", "red", ".", ",", "?", "it"]
  tokenizer = tokenizer_lib.build_word_tokenizer(words)
  ids = tokenizer.encode("John 's hat is n't red , is it ?", add_special_tokens=False) + [1, 0, 0]
  config = base_config()
  setup = types.SimpleNamespace(config=config, tokenizer=tokenizer)
  assert config.data.clean_up_tokenization_spaces is True
  assert generate.decode(setup, [ids]) == ["John's hat isn't red, is it?"]
  config.data.clean_up_tokenization_spaces = False
  assert generate.decode(setup, [ids]) == ["John 's hat is n't red , is it ?"]
  # As decoded: a tokenizer whose decoding keeps edge spaces (a Metaspace decoder that strips no prefix).
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "\u2581": 3, "\u2581hat": 4, "s": 5}
  spaced = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  spaced.decoder = tokenizers.decoders.Metaspace(prepend_scheme="never")
  setup.tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=spaced, pad_token="<pad>",
                                                         eos_token="</s>", unk_token="<unk>")
  assert generate.decode(setup, [[3, 4, 5, 3, 1, 0]]) == ["  hats "]


def _tiny_conditional(tmp_path):
  """A conditional experiment on a JSONL copy task (word tokenizer, random encoder, an untrained tiny ELF)."""
  words = [f"w{i}" for i in range(20)]
  rng = np.random.default_rng(0)
  with open(tmp_path / "validation.jsonl", "w", encoding="utf-8") as f:
    for _ in range(6):
      sentence = " ".join(rng.choice(words, 3))
      f.write(json.dumps({"input": sentence, "output": sentence}) + "\n")
  tokenizer_lib.build_word_tokenizer(words, save_dir=str(tmp_path / "tok"))
  config = recipes.tiny()
  config.data.update(source="jsonl", path=str(tmp_path / "{split}.jsonl"), conditional=True, tokenizer=str(
      tmp_path / "tok"), max_length=8, max_condition_length=4, eval_split="validation")
  config.model.vocab_size = 23
  config.encoder.measure_latent_stats = False
  config.sample.update(steps=2, batch_size=8, num_samples=6, cfg_scale=2.0)
  config.eval.mbr_candidates = 3
  exp = experiment.build(config)
  params = nn.unbox(init_params(exp.model, jax.random.PRNGKey(1), config.data.max_length))
  return exp, params


@pytest.mark.slow  # three sampling runs, each compiling its sampler (~25 s of CPU)
def test_mbr_beside_the_single_sample_score(tmp_path):
  """eval.mbr_candidates = 3 on a tiny conditional task: the plain scores are those of the first draw (the same as
  without MBR), and mbr_* score each condition's MBR choice among the three draws."""
  exp, params = _tiny_conditional(tmp_path)
  conditions = generate.eval_conditions(exp, 6)
  scored = generate.generate_and_score(exp, params, 6, seed=0, conditions=conditions)
  plain = generate.generate(exp, params, 6, 0, conditions=conditions)
  assert plain.candidates == () and scored.samples == plain.samples
  assert {k: v for k, v in scored.metrics.items() if not k.startswith("mbr_")} == generate.score(exp, plain.samples)
  drawn = generate.generate(exp, params, 6, 0, conditions=conditions, candidates=3)
  assert drawn.samples == plain.samples and len(drawn.candidates) == 2
  draws = [plain.samples.texts] + [c.texts for c in drawn.candidates]
  assert draws[1] != draws[0] and draws[2] != draws[1]
  assert all(c.references == plain.samples.references for c in drawn.candidates)
  chosen = text_metrics.mbr_select(list(zip(*draws)), "bleu")
  assert scored.mbr_samples.texts == [draws[c][i] for i, c in enumerate(chosen)]
  want = text_metrics.bleu(scored.mbr_samples.texts, plain.samples.references)
  assert scored.metrics["mbr_bleu"] == pytest.approx(want, rel=1e-12)
  assert {"mbr_rougeL", "mbr_self_bleu", "mbr_distinct_2"} <= set(scored.metrics)
