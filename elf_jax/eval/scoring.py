"""The scores of decoded samples (docs/method.md#evaluation), one entry point (`score`) for every task:
BLEU / ROUGE, Gen. PPL and entropy (exact or GPT-2), MAUVE and diversity.

Which scores each task gets: docs/evaluation.md#scores-per-task.
"""
import math

import jax
import ml_collections

from elf_jax.eval import gen_ppl, text_metrics


def length_matched_mauve(scorer: gen_ppl.GenPPLScorer, texts: list[str], references: list[str]) -> float:
  """MAUVE of the non-empty samples (q) against as many non-empty reference texts (p), reference i cut to the GPT-2
  length of sample i so that length tells them apart no more than content; features from `scorer`'s GPT-2.
  nan when there is nothing to compare."""
  sample_ids = scorer.token_ids(gen_ppl.nonempty(texts))
  reference_ids = scorer.token_ids(gen_ppl.nonempty(references))
  n = min(len(sample_ids), len(reference_ids))
  if n == 0:
    return math.nan
  p = scorer.features([ref[:len(ids)] for ref, ids in zip(reference_ids[:n], sample_ids[:n])])
  return text_metrics.mauve(p, scorer.features(sample_ids[:n]))


def score(texts: list[str], config: ml_collections.ConfigDict, *, references: list[str] | None = None,
          language=None, true_texts: list[str] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Scores of `texts` by metric name.

  Args:
    texts: the decoded samples.
    config: the run config (`data.conditional`, `eval.gpt2`, `eval.batch_size`, `eval.mauve`).
    references: conditional tasks: the target text of each sample.
    language: the synthetic language (`elf_jax.data.synthetic`) when the data is synthetic.
    true_texts: held-out texts: the synthetic language's true sentences (scored the same way, for the ratios), or
      MAUVE's references under GPT-2 (needed when eval.mauve).
    mesh: GPT-2 scoring runs over the mesh's batch axes (None: one device).
  """
  diversity = text_metrics.diversity(texts)
  if config.data.conditional:
    if references is None or len(references) != len(texts):
      raise ValueError("conditional scores need one reference text per sample")
    return {"bleu": text_metrics.bleu(texts, references), **text_metrics.rouge(texts, references), **diversity}
  if language is None:
    scorer = gen_ppl.GenPPLScorer.from_pretrained(config.eval.gpt2, batch_size=config.eval.batch_size, mesh=mesh)
    figures = {**scorer.score(texts), **diversity}
    if config.eval.mauve:
      if true_texts is None:
        raise ValueError("MAUVE (eval.mauve) needs held-out reference texts: pass true_texts")
      figures["mauve"] = length_matched_mauve(scorer, texts, true_texts)
    return figures
  kept = gen_ppl.nonempty(texts)
  true = language.gen_ppl_and_entropy(true_texts)
  figures = language.gen_ppl_and_entropy(kept) if kept else {"gen_ppl": math.nan, "entropy": math.nan}
  return {**figures, "num_empty": len(texts) - len(kept), "true_gen_ppl": true["gen_ppl"],
          "true_entropy": true["entropy"], "gen_ppl_ratio": figures["gen_ppl"] / true["gen_ppl"],
          "entropy_ratio": figures["entropy"] / true["entropy"], **diversity}
