"""Text metrics (docs/method.md#evaluation): BLEU (WMT14 De→En) and ROUGE (XSum) of hypotheses paired by index with
one reference each; MBR selection among several samples per condition; diversity (self-BLEU, distinct-n); MAUVE from
features.
"""
from collections.abc import Sequence
import math

import numpy as np
from rouge_score import rouge_scorer
import sacrebleu
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from elf_jax.config import MBR_METRICS, check_choice

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_BLEU_ORDER = 4
_TOKENIZE_13A = Tokenizer13a()


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they are paired by index")
  if len(hypotheses) == 0:
    raise ValueError("no hypotheses to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """sacreBLEU corpus BLEU (0-100), lowercased, default 13a tokenisation, one reference per hypothesis, with
  effective order (n-gram orders that no hypothesis reaches are left out, as the official evaluation does)."""
  _check_pairs(hypotheses, references)
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True,
                                     use_effective_order=True).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """ROUGE-1/2/L F-measure × 100 with Porter stemming (rouge-score), mean over examples."""
  _check_pairs(hypotheses, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(target=ref, prediction=hyp) for hyp, ref in zip(hypotheses, references)]
  return {k: float(np.mean([s[k].fmeasure for s in scores]) * 100) for k in ROUGE_TYPES}


def mauve(p_features: np.ndarray, q_features: np.ndarray) -> float:
  """MAUVE (0-1) between reference texts (p) and samples (q) from their features (N,E), computed by the optional
  package mauve-text with its own defaults (k-means on PCA-reduced features, scaling factor 5, seed 25). Features come
  from our GPT-2 (`gen_ppl.GenPPLScorer.features`), so mauve needs neither torch nor a download here."""
  try:
    import mauve as mauve_text  # pylint: disable=import-outside-toplevel  (GPLv3, an optional extra)
  except ImportError as e:
    raise ImportError("MAUVE needs the optional package mauve-text: pip install 'elf_jax[mauve]' (or set "
                      "--config.eval.mauve=False)") from e
  return float(mauve_text.compute_mauve(p_features=np.asarray(p_features), q_features=np.asarray(q_features),
                                        device_id=-1, verbose=False).mauve)


def _words(text: str) -> list[str]:
  """sacreBLEU's default (13a) tokenization of a text, as sentence_bleu sees it."""
  return _TOKENIZE_13A(text.rstrip()).split()


def self_bleu(texts: Sequence[str]) -> float:
  """Self-BLEU (0-100; lower = more diverse): the mean over texts of sacreBLEU's `sentence_bleu(text, others)`
  (13a tokens, case kept, exp smoothing, effective order) where `others` are all the other texts as references.

  Computed in one pass: the clipping count of an n-gram against the others is the largest count among them, which
  is the corpus maximum unless this text alone holds it (then the second largest); the reference length is the
  others' length closest to the text's (ties: the shorter), as sacreBLEU picks it. nan with fewer than two texts.
  """
  if len(texts) < 2:
    return math.nan
  ngrams, lengths = zip(*(extract_all_word_ngrams(" ".join(_words(t)), 1, _BLEU_ORDER) for t in texts))
  lengths = np.asarray(lengths)
  best: dict[tuple, list[int]] = {}  # n-gram -> [largest count, index of a text holding it, second largest]
  for i, counts in enumerate(ngrams):
    for ngram, c in counts.items():
      entry = best.setdefault(ngram, [0, -1, 0])
      if c > entry[0]:
        entry[:] = [c, i, entry[0]]
      elif c > entry[2]:
        entry[2] = c
  scores = []
  for i, counts in enumerate(ngrams):
    correct, total = [0] * _BLEU_ORDER, [0] * _BLEU_ORDER
    for ngram, c in counts.items():
      largest, holder, second = best[ngram]
      correct[len(ngram) - 1] += min(c, second if holder == i else largest)
      total[len(ngram) - 1] += c
    others = np.delete(lengths, i)
    diff = np.abs(others - lengths[i])
    ref_len = int(others[diff == diff.min()].min())
    scores.append(sacrebleu.BLEU.compute_bleu(correct, total, int(lengths[i]), ref_len, smooth_method="exp",
                                              effective_order=True, max_ngram_order=_BLEU_ORDER).score)
  return float(np.mean(scores))


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Distinct-n (0-1; higher = more diverse): distinct n-grams over all n-grams of all texts (13a tokens, each text's
  n-grams taken within it); nan when the texts hold no n-gram."""
  grams = [tuple(w[i:i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else math.nan


def diversity(texts: Sequence[str]) -> dict[str, float]:
  """self_bleu and distinct_1 ... distinct_4 of the non-empty texts (empty ones dropped, as for Gen. PPL)."""
  kept = [t for t in texts if t.strip()]
  return {"self_bleu": self_bleu(kept), **{f"distinct_{n}": distinct_n(kept, n) for n in range(1, 5)}}


def mbr_select(candidates: Sequence[Sequence[str]], metric: str) -> list[int]:
  """Minimum-Bayes-risk choice among the k candidates of each condition: the index of the candidate with the highest
  mean utility against the other k - 1 (ties: the first).

  Args:
    candidates: per condition, its k >= 1 sampled texts.
    metric: one of config.MBR_METRICS: "bleu" (sacreBLEU sentence_bleu, lowercased as `bleu`, candidate as
      hypothesis, other as reference) or "rougeL" (ROUGE-L F-measure with Porter stemming, as `rouge`).
  """
  check_choice("eval.mbr_metric", metric, MBR_METRICS)
  if metric == "bleu":
    utility = lambda hyp, ref: sacrebleu.sentence_bleu(hyp, [ref], lowercase=True).score
  else:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    utility = lambda hyp, ref: scorer.score(target=ref, prediction=hyp)["rougeL"].fmeasure
  chosen = []
  for texts in candidates:
    k = len(texts)
    means = [np.mean([utility(texts[i], texts[j]) for j in range(k) if j != i]) if k > 1 else 0.0 for i in range(k)]
    chosen.append(int(np.argmax(means)))
  return chosen
