"""What a samples file is scored with: Gen. PPL, diversity and length-matched MAUVE on the tiny GPT-2."""
import pytest

from elf_jax.config import base_config
from elf_jax.eval import gen_ppl, scoring, text_metrics

from tests.eval.conftest import TEXTS


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
