"""The scores of decoded samples (docs/method.md#evaluation), one entry point for every task:

  conditional tasks      BLEU (effective order) and ROUGE-1/2/L against each sample's reference text;
  synthetic language     its exact Gen. PPL and entropy, next to the same figures for held-out true sentences;
  any other data         GPT-2 Gen. PPL and entropy (`config.eval.gpt2`).

Gen. PPL and entropy drop empty samples first and report how many as `num_empty` (the official protocol).
"""
import math

import jax
import ml_collections

from elf_jax.eval import gen_ppl
from elf_jax.eval import text_metrics


def score(texts: list[str], config: ml_collections.ConfigDict, *, references: list[str] | None = None,
          language=None, true_texts: list[str] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Scores of `texts` by metric name.

  Args:
    texts: the decoded samples.
    config: the run config (`data.conditional`, `eval.gpt2`, `eval.batch_size`).
    references: conditional tasks: the target text of each sample.
    language: the synthetic language (`elf_jax.data.synthetic`) when the data is synthetic.
    true_texts: synthetic language: held-out true sentences, scored the same way for the ratios.
    mesh: GPT-2 scoring runs over the mesh's batch axes (None: one device).
  """
  if config.data.conditional:
    if references is None or len(references) != len(texts):
      raise ValueError("conditional scores need one reference text per sample")
    return {"bleu": text_metrics.bleu(texts, references), **text_metrics.rouge(texts, references)}
  if language is None:
    scorer = gen_ppl.GenPPLScorer.from_pretrained(config.eval.gpt2, batch_size=config.eval.batch_size, mesh=mesh)
    return scorer.score(texts)
  kept = gen_ppl.nonempty(texts)
  true = language.gen_ppl_and_entropy(true_texts)
  figures = language.gen_ppl_and_entropy(kept) if kept else {"gen_ppl": math.nan, "entropy": math.nan}
  return {**figures, "num_empty": len(texts) - len(kept), "true_gen_ppl": true["gen_ppl"],
          "true_entropy": true["entropy"], "gen_ppl_ratio": figures["gen_ppl"] / true["gen_ppl"],
          "entropy_ratio": figures["entropy"] / true["entropy"]}
