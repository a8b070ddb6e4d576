"""Conditional-generation metrics (docs/method.md#evaluation): BLEU (WMT14 De→En), ROUGE (XSum), and optional MAUVE.

Each hypothesis is paired with one reference string at the same index.
"""
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
import sacrebleu

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


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


def mauve_score(reference_texts: Sequence[str], sample_texts: Sequence[str], **kwargs) -> float:
  """MAUVE (0-1) between human reference texts (p) and model samples (q); needs the optional `mauve-text`.

  kwargs go to `mauve.compute_mauve` (e.g. featurize_model_name, device_id, max_text_length); its default
  featurizer is GPT-2 Large, which it downloads itself.
  """
  try:
    import mauve  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("MAUVE needs the optional package mauve-text: `pip install mauve-text`") from e
  return float(mauve.compute_mauve(p_text=list(reference_texts), q_text=list(sample_texts), **kwargs).mauve)
