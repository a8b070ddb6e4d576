"""What `generate.score` scores and which texts are the references; decoding as the official environment; MBR beside
the single-sample score."""
import json
import types

from flax import linen as nn
import jax
import numpy as np
import pytest
import tokenizers
import transformers

from elf_jax import recipes
from elf_jax.config import base_config
from elf_jax.data import sources
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.eval import text_metrics
from elf_jax.model.elf import init_params
from elf_jax.run import experiment, generate
from elf_jax.sampling.files import Samples


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
