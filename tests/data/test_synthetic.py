"""The synthetic language: determinism, grammaticality, exact probabilities, Gen. PPL / entropy figures; the
synthetic translation task's rule."""
import collections
import itertools
import math
import re

import numpy as np
import pytest

from elf_jax.data import synthetic


@pytest.fixture(scope="module")
def language():
  return synthetic.SyntheticLanguage(seed=7)


@pytest.fixture(scope="module")
def samples(language):
  return language.sample(2000, np.random.default_rng(0))


def _tiny_language():
  """Three states, three words shared between states (ambiguous), acyclic: sentences of 1 to 3 words."""
  start = np.array([0.6, 0.4, 0.0])
  transition = np.array([[0.0, 0.5, 0.3], [0.0, 0.0, 0.7], [0.0, 0.0, 0.0]])
  end = np.array([0.2, 0.3, 1.0])
  emission = np.array([[0.5, 0.5, 0.0], [0.0, 0.4, 0.6], [0.3, 0.3, 0.4]])
  return synthetic.HiddenMarkovLanguage(["x", "y", "z"], start, transition, end, emission)


def _brute_force_log_prob(lang, sentence):
  """Sum over every state path of its probability (depth-first), independent of the forward recursion."""
  word_id = {w: i for i, w in enumerate(lang.vocabulary)}
  words = sentence.split()
  if any(w not in word_id for w in words):
    return -math.inf
  ids = [word_id[w] for w in words]

  def paths(state, t, prob):
    prob *= lang.emission[state, ids[t]]
    if prob == 0.0:
      return 0.0
    if t == len(ids) - 1:
      return prob * lang.end[state]
    return sum(paths(nxt, t + 1, prob * lang.transition[state, nxt]) for nxt in np.flatnonzero(lang.transition[state]))

  total = sum(paths(s, 0, lang.start[s]) for s in np.flatnonzero(lang.start))
  return math.log(total) if total > 0 else -math.inf


def test_deterministic_for_a_seed():
  a, b, c = (synthetic.SyntheticLanguage(seed=s) for s in (3, 3, 4))
  for name in ("start", "transition", "end", "emission"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert a.sample(50, np.random.default_rng(1)) == b.sample(50, np.random.default_rng(1))
  assert a.vocabulary == c.vocabulary and not np.array_equal(a.emission, c.emission)


def test_sentences_are_short_and_grammatical(language, samples):
  assert language.max_words == 14
  assert 200 <= len(language.vocabulary) <= 500
  lengths = [len(s.split()) for s in samples]
  assert max(lengths) <= 14 and 4.0 < np.mean(lengths) < 9.0
  assert all(math.isfinite(language.log_prob(s)) for s in samples[:300])
  after_a = {s.split()[i + 1] for s in samples for i, w in enumerate(s.split()[:-1]) if w == "a"}
  assert after_a and not any(w[0] in "aeiou" for w in after_a)


@pytest.mark.parametrize("sentence", [
    "", "the zebra sleeps", "sleeps cat the", "the cats sleeps", "a cats sleep", "the cat sleep",
    "tom reads her",  # reading takes a readable object, not a person
    "the dog sleeps yesterday", "the cat eats the park", "the cat near the houses sleep",
])
def test_ungrammatical_sentences_have_probability_zero(language, sentence):
  assert language.log_prob(sentence) == -math.inf


def test_agreement_across_prepositional_phrase_and_ambiguity(language):
  for sentence in ("the cat near the houses sleeps", "the sheep sleeps", "the sheep sleep", "tom read her book",
                   "the cats slept yesterday", "she sees her"):
    assert math.isfinite(language.log_prob(sentence)), sentence


def test_log_prob_matches_brute_force_path_sum(language, samples):
  for sentence in samples[:40] + ["the sheep sleep", "she sees her", "tom read her book"]:
    np.testing.assert_allclose(language.log_prob(sentence), _brute_force_log_prob(language, sentence), rtol=1e-10)


def test_tiny_language_probabilities_sum_to_one():
  lang = _tiny_language()
  assert lang.max_words == 3
  sentences = [" ".join(ws) for n in (1, 2, 3) for ws in itertools.product(lang.vocabulary, repeat=n)]
  log_probs = [lang.log_prob(s) for s in sentences]
  for s, lp in zip(sentences, log_probs):
    np.testing.assert_allclose(lp, _brute_force_log_prob(lang, s), rtol=1e-12)
  np.testing.assert_allclose(sum(math.exp(lp) for lp in log_probs), 1.0, rtol=1e-12)
  assert lang.log_prob("x x x x") == -math.inf


def test_tiny_language_empirical_frequencies_match():
  lang = _tiny_language()
  n = 20000
  counts = collections.Counter(lang.sample(n, np.random.default_rng(5)))
  for sentence, count in counts.items():
    p = math.exp(lang.log_prob(sentence))
    assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (sentence, count / n, p)
  assert sum(counts.values()) == n


def test_gen_ppl_and_entropy_definitions(language):
  good = ["the cat sees the dog", "tom sleeps"]
  bad = "dog the the"
  lp = [language.log_prob(s) for s in good]
  out = language.gen_ppl_and_entropy(good + [bad], smoothing=1e-3)
  np.testing.assert_allclose(out["gen_ppl_grammatical"], math.exp(-sum(lp) / (6 + 3)), rtol=1e-12)
  log_u = -math.log(len(language.vocabulary) + 2)
  smoothed = [np.logaddexp(math.log(1 - 1e-3) + l, math.log(1e-3) + n * log_u) for l, n in zip(lp, (6, 3))]
  smoothed.append(math.log(1e-3) + 4 * log_u)
  np.testing.assert_allclose(out["gen_ppl"], math.exp(-sum(smoothed) / 13), rtol=1e-12)
  h_first = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))
  h_bad = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
  np.testing.assert_allclose(out["entropy"], (h_first + math.log(2) + h_bad) / 3, rtol=1e-12)
  assert out["ungrammatical_fraction"] == pytest.approx(1 / 3)
  assert out["gen_ppl"] > out["gen_ppl_grammatical"]


def test_true_text_scores_better_than_shuffled_text(language, samples):
  rng = np.random.default_rng(0)
  true = language.gen_ppl_and_entropy(samples[:500])
  shuffled = language.gen_ppl_and_entropy([" ".join(rng.permutation(s.split())) for s in samples[:500]])
  assert true["ungrammatical_fraction"] == 0.0 and shuffled["ungrammatical_fraction"] > 0.5
  assert shuffled["gen_ppl"] > 5 * true["gen_ppl"]
  np.testing.assert_allclose(shuffled["entropy"], true["entropy"])


def test_words_per_class_gives_a_smaller_valid_language():
  small = synthetic.SyntheticLanguage(seed=7, words_per_class=2)
  full = synthetic.SyntheticLanguage(seed=7)
  assert set(small.vocabulary) < set(full.vocabulary) and len(small.vocabulary) < 150
  sentences = small.sample(200, np.random.default_rng(2))
  assert all(math.isfinite(small.log_prob(s)) and math.isfinite(full.log_prob(s)) for s in sentences)


# The synthetic translation task (configs/tiny_cond.py).

@pytest.fixture(scope="module")
def translation(language):
  return synthetic.SyntheticTranslation(language.vocabulary)


def test_translation_of_written_examples(translation):
  """Nouns move in front of their adjectives (mirror order); copula adjectives stay; then word by word."""
  gloss = lambda words: " ".join(synthetic.target_word(w) for w in words.split())
  assert translation.translate("the big brown cats chase the young man") == gloss(
      "the cats brown big chase the man young")
  assert translation.translate("the small cat near the big park is very happy today") == gloss(
      "the cat small near the park big is very happy today")
  assert translation.translate("tom sleeps") == gloss("tom sleeps")
  assert synthetic.target_word("cat") == translation.target_of["cat"]
  assert re.fullmatch(r"([bdfghklmnprstvz][aeiou]){3}", translation.target_of["cat"])


def test_translation_target_words_are_distinct_and_new(translation, language):
  targets = list(translation.target_of.values())
  assert len(language.vocabulary) == 399 and len(set(targets)) == 399
  assert not set(targets) & set(language.vocabulary)
  assert translation.vocabulary == language.vocabulary + targets
  # The same word gets the same target word in every language (the rule does not depend on seed or size).
  small = synthetic.SyntheticLanguage(seed=3, words_per_class=1)
  assert synthetic.SyntheticTranslation(small.vocabulary).target_of == {w: translation.target_of[w]
                                                                         for w in small.vocabulary}


def _reorder_by_tags(words):
  """The rule's word order, computed independently: tag words A (adjective) / N (noun) / O, reverse every match of
  A+N in the tag string."""
  adjectives = {a for first, second in synthetic._ADJECTIVES.values() for a in first + second}
  nouns = {form for pairs in synthetic._NOUNS.values() for pair in pairs for form in pair}
  tags = "".join("A" if w in adjectives else "N" if w in nouns else "O" for w in words)
  order = list(range(len(words)))
  for match in re.finditer("A+N", tags):
    order[match.start():match.end()] = order[match.start():match.end()][::-1]
  return [words[i] for i in order]


def test_translation_of_sampled_sentences_is_the_rule(translation, samples):
  source_of = {t: s for s, t in translation.target_of.items()}
  moved = 0
  for sentence in samples:
    target = translation.translate(sentence).split()
    back = [source_of[w] for w in target]
    assert back == _reorder_by_tags(sentence.split())
    moved += back != sentence.split()
  assert 0.2 < moved / len(samples) < 0.8  # the reordering is part of the task for a good share of sentences
