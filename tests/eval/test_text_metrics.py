"""BLEU (effective order), ROUGE, MAUVE wrappers, self-BLEU, distinct-n and the MBR choice, against sacreBLEU,
rouge-score and hand-computed figures."""
import math
import subprocess
import sys

import numpy as np
import pytest
from rouge_score import rouge_scorer
import sacrebleu

from elf_jax.eval import text_metrics

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
