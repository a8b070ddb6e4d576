"""A seeded synthetic English-like language with exact sentence probabilities (the offline default corpus).

`HiddenMarkovLanguage` samples sentences and gives their exact log-probability (forward algorithm);
`SyntheticTranslation` is the offline conditional task. The grammar, agreement rules, seeded weights and the
probability formula: docs/data.md#synthetic-language.
"""
import bisect
import collections
from collections.abc import Iterable, Mapping, Sequence
import math
import zlib

import numpy as np

_ZIPF_EXPONENT = 1.1  # word weights within a class: 1 / rank^s, the lists' order being most common first
_NOISE = 0.3  # std of the seeded log-normal factor on every word weight and grammar branch weight
_END = "<end>"
_START = "<start>"

# Nouns by semantic class, (singular, plural), most common first. All start with a consonant.
_NOUNS = {
    "animal": [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("horse", "horses"), ("mouse", "mice"),
               ("fox", "foxes"), ("rabbit", "rabbits"), ("cow", "cows"), ("sheep", "sheep"), ("duck", "ducks"),
               ("wolf", "wolves"), ("frog", "frogs"), ("fish", "fish"), ("goat", "goats"), ("pig", "pigs"),
               ("bear", "bears")],
    "person": [("man", "men"), ("woman", "women"), ("child", "children"), ("teacher", "teachers"),
               ("farmer", "farmers"), ("doctor", "doctors"), ("girl", "girls"), ("boy", "boys"),
               ("baker", "bakers"), ("student", "students"), ("king", "kings"), ("queen", "queens"),
               ("sailor", "sailors"), ("nurse", "nurses"), ("painter", "painters"), ("friend", "friends")],
    "food": [("cake", "cakes"), ("pear", "pears"), ("plum", "plums"), ("bun", "buns"), ("pie", "pies"),
             ("carrot", "carrots"), ("sandwich", "sandwiches"), ("cookie", "cookies"), ("potato", "potatoes"),
             ("tomato", "tomatoes"), ("peach", "peaches"), ("lemon", "lemons"), ("melon", "melons"),
             ("cherry", "cherries"), ("banana", "bananas"), ("nut", "nuts")],
    "readable": [("book", "books"), ("letter", "letters"), ("story", "stories"), ("map", "maps"),
                 ("note", "notes"), ("poem", "poems"), ("newspaper", "newspapers"), ("card", "cards"),
                 ("list", "lists"), ("magazine", "magazines")],
    "thing": [("ball", "balls"), ("box", "boxes"), ("hat", "hats"), ("key", "keys"), ("cup", "cups"),
              ("chair", "chairs"), ("lamp", "lamps"), ("bag", "bags"), ("toy", "toys"), ("coin", "coins"),
              ("stone", "stones"), ("table", "tables"), ("bottle", "bottles"), ("clock", "clocks"),
              ("pen", "pens"), ("shoe", "shoes")],
    "place": [("park", "parks"), ("house", "houses"), ("garden", "gardens"), ("forest", "forests"),
              ("river", "rivers"), ("town", "towns"), ("school", "schools"), ("market", "markets"),
              ("field", "fields"), ("kitchen", "kitchens"), ("village", "villages"), ("hill", "hills"),
              ("beach", "beaches"), ("lake", "lakes"), ("city", "cities"), ("road", "roads")],
}
_COLOURS = ["red", "green", "blue", "brown", "white", "black", "yellow", "grey"]
# Adjectives by semantic class: first slot (size / quality), second slot (colour / state).
_ADJECTIVES = {
    "animal": (["big", "small", "little", "tiny", "huge", "nice", "strange"],
               ["brown", "white", "black", "grey", "hungry", "sleepy", "lazy", "happy"]),
    "person": (["young", "tall", "nice", "strange", "good", "kind"],
               ["happy", "hungry", "tired", "clever", "busy", "sad", "brave", "lazy"]),
    "food": (["big", "small", "little", "nice", "strange"],
             ["red", "green", "yellow", "brown", "sweet", "fresh", "warm"]),
    "readable": (["long", "short", "new", "good", "strange", "funny"], ["red", "blue", "green", "white", "black"]),
    "thing": (["big", "small", "little", "tiny", "huge", "new", "nice", "strange"], _COLOURS),
    "place": (["big", "small", "quiet", "busy", "dark", "nice", "sunny"], ["green", "white", "grey"]),
}
_DETERMINERS = {
    "sg": ["the", "a", "this", "that", "every", "my", "his", "her", "our", "their", "your"],
    "pl": ["the", "these", "those", "some", "many", "two", "three", "my", "his", "her", "our", "their", "your"],
}
_NAMES = ["tom", "anna", "max", "lucy", "sam", "emma", "ben", "mia", "leo", "nina"]
_SUBJECT_PRONOUNS = {"sg": ["he", "she"], "pl": ["they", "we", "you"]}
_OBJECT_PRONOUNS = ["him", "her", "them", "us", "me", "you"]
_COPULA = {("sg", "present"): "is", ("pl", "present"): "are", ("sg", "past"): "was", ("pl", "past"): "were"}
# Prepositional phrases after a subject noun: noun class of the phrase -> its prepositions.
_PREPOSITIONS = {"place": ["in", "near", "from", "behind"], "thing": ["with", "under", "beside", "behind"]}
_ADVERBS = {"present": ["again", "today", "quickly", "slowly", "now", "often", "here", "quietly"],
            "past": ["again", "yesterday", "quickly", "slowly", "today", "once", "here", "quietly"]}
_A, _P = ("animal",), ("person",)
_AP = ("animal", "person")
# Verbs: (third person singular, plural, past, subject classes), grouped by the object they take (None: none).
_VERBS = {
    None: [("sleeps", "sleep", "slept", _AP), ("runs", "run", "ran", _AP), ("walks", "walk", "walked", _AP),
           ("sings", "sing", "sang", _AP), ("waits", "wait", "waited", _AP), ("plays", "play", "played", _AP),
           ("swims", "swim", "swam", _AP), ("jumps", "jump", "jumped", _A), ("hides", "hide", "hid", _A),
           ("laughs", "laugh", "laughed", _P), ("smiles", "smile", "smiled", _P), ("works", "work", "worked", _P),
           ("dances", "dance", "danced", _P)],
    "food": [("eats", "eat", "ate", _AP), ("wants", "want", "wanted", _AP), ("smells", "smell", "smelled", _AP),
             ("cooks", "cook", "cooked", _P), ("buys", "buy", "bought", _P), ("shares", "share", "shared", _P)],
    "readable": [("reads", "read", "read", _P), ("writes", "write", "wrote", _P), ("sends", "send", "sent", _P)],
    "portable": [("carries", "carry", "carried", _P), ("holds", "hold", "held", _P), ("takes", "take", "took", _P),
                 ("drops", "drop", "dropped", _P), ("sells", "sell", "sold", _P), ("brings", "bring", "brought", _P)],
    "concrete": [("sees", "see", "saw", _AP), ("likes", "like", "liked", _AP), ("watches", "watch", "watched", _AP),
                 ("finds", "find", "found", _AP), ("remembers", "remember", "remembered", _P)],
    "animate": [("chases", "chase", "chased", _A), ("follows", "follow", "followed", _AP),
                ("bites", "bite", "bit", _A), ("helps", "help", "helped", _P), ("meets", "meet", "met", _P)],
    "place": [("visits", "visit", "visited", _P), ("leaves", "leave", "left", _P), ("cleans", "clean", "cleaned", _P),
              ("paints", "paint", "painted", _P)],
}
# Object kind -> noun classes it draws from, with weights.
_OBJECTS = {
    "food": {"food": 1.0},
    "readable": {"readable": 1.0},
    "portable": {"food": 0.3, "readable": 0.3, "thing": 0.4},
    "concrete": {"animal": 0.25, "person": 0.25, "food": 0.1, "readable": 0.1, "thing": 0.2, "place": 0.1},
    "animate": {"animal": 0.5, "person": 0.5},
    "place": {"place": 1.0},
}
# Verb phrase kind (object kind, None = intransitive, or "copula") by subject class.
_VERB_PHRASES = {
    "animal": {None: 0.3, "copula": 0.15, "food": 0.15, "concrete": 0.2, "animate": 0.2},
    "person": {None: 0.18, "copula": 0.12, "food": 0.12, "readable": 0.1, "portable": 0.14, "concrete": 0.14,
               "animate": 0.08, "place": 0.12},
}
_SUBJECT_SHARES = {"noun_phrase": 0.85, "name": 0.1, "pronoun": 0.05}
_SUBJECT_CLASSES = {"animal": 0.5, "person": 0.5}
_OBJECT_SHARES = {"noun_phrase": 0.7, "name": 0.2, "pronoun": 0.1}  # person objects
_TENSES = {"present": 0.6, "past": 0.4}
_NUMBERS = {"sg": 0.6, "pl": 0.4}
# Noun phrase shape: determiner -> first adjective / second adjective / noun, first adjective -> second / noun.
_DET_NEXT = {"adj1": 0.3, "adj2": 0.15, "noun": 0.55}
_ADJ1_NEXT = {"adj2": 0.3, "noun": 0.7}
_PP_PROB = 0.2  # subject noun -> prepositional phrase
_ADVERB_PROB = 0.25  # end of a verb phrase -> adverb
_VERY_PROB = 0.2  # copula -> "very"
# The translation rule's word forms: three consonant-vowel syllables drawn with numpy seed (seed, crc32(word)).
_TRANSLATION_SEED = 0
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES_PER_WORD = 3


class HiddenMarkovLanguage:
  """A language given by an HMM with an end-of-sentence event; sampling and exact log-probabilities.

  Attributes:
    vocabulary: list of the V words (sorted); word ids below index this list.
    start: (K,) float64, P(first state).
    transition: (K, K) float64, P(next state | state); row k sums to 1 - end[k].
    end: (K,) float64, P(sentence ends | state).
    emission: (K, V) float64, P(word | state); rows sum to 1.
    state_names: K names, for inspection.
    max_words: the longest possible sentence in words, or None if the state graph has cycles.
  """

  def __init__(self, vocabulary: Sequence[str], start: np.ndarray, transition: np.ndarray, end: np.ndarray,
               emission: np.ndarray, state_names: Sequence[str] | None = None):
    self.vocabulary = list(vocabulary)
    self.start = np.asarray(start, np.float64)
    self.transition = np.asarray(transition, np.float64)
    self.end = np.asarray(end, np.float64)
    self.emission = np.asarray(emission, np.float64)
    k, v = self.emission.shape
    self.state_names = list(state_names) if state_names is not None else [f"s{i}" for i in range(k)]
    if len(self.vocabulary) != v or len(set(self.vocabulary)) != v:
      raise ValueError(f"vocabulary must hold {v} distinct words, got {len(self.vocabulary)}")
    if self.start.shape != (k,) or self.transition.shape != (k, k) or self.end.shape != (k,):
      raise ValueError(f"start/transition/end must have shapes ({k},), ({k}, {k}), ({k},)")
    if not (np.allclose(self.start.sum(), 1.0) and np.allclose(self.transition.sum(1) + self.end, 1.0)
            and np.allclose(self.emission.sum(1), 1.0)):
      raise ValueError("start, each row of [transition | end] and each emission row must sum to 1")
    self._word_id = {w: i for i, w in enumerate(self.vocabulary)}
    self._emission_by_word = np.ascontiguousarray(self.emission.T)  # (V, K)
    self._draw_start = _sparse_categorical(self.start)
    self._draw_next = [_sparse_categorical(row) for row in np.concatenate([self.transition, self.end[:, None]], 1)]
    self._draw_word = [_sparse_categorical(row) for row in self.emission]
    self.max_words = _longest_path(self.transition > 0, self.start > 0, self.end > 0)

  def sample(self, n: int, rng: np.random.Generator) -> list[str]:
    """Draws n sentences (space-joined words) from the language with the numpy Generator `rng`."""
    return [self._sample_one(rng) for _ in range(n)]

  def _sample_one(self, rng: np.random.Generator) -> str:
    k = len(self.start)
    state = _draw(self._draw_start, rng)
    words = []
    while True:
      words.append(self.vocabulary[_draw(self._draw_word[state], rng)])
      state = _draw(self._draw_next[state], rng)  # index K: the end event
      if state == k:  # the end event
        return " ".join(words)

  def log_prob(self, sentence: str) -> float:
    """Exact natural-log probability of a whitespace-separated sentence, end-of-sentence event included.

    Returns -inf for an empty, out-of-vocabulary or ungrammatical sentence.
    """
    ids = [self._word_id.get(w) for w in sentence.split()]
    if not ids or None in ids:
      return -math.inf
    alpha = self.start * self._emission_by_word[ids[0]]
    log_scale = 0.0
    for w in ids[1:]:
      total = alpha.sum()
      if total == 0.0:
        return -math.inf
      log_scale += math.log(total)
      alpha = (alpha / total) @ self.transition * self._emission_by_word[w]
    final = float(alpha @ self.end)
    return log_scale + math.log(final) if final > 0.0 else -math.inf

  def gen_ppl_and_entropy(self, sentences: Iterable[str], smoothing: float = 1e-3) -> dict[str, float]:
    """Gen. PPL and unigram entropy of sentences under this (true) language, mirroring docs/method.md#evaluation.

    Per sentence of n words the n + 1 tokens (words and the end event) count. Ungrammatical and out-of-vocabulary
    sentences have probability 0 under the language; two figures treat them differently:
      gen_ppl: exp(token-weighted mean NLL) of ALL sentences under the smoothed language
        (1 - smoothing) P + smoothing U, where U draws each of the n + 1 tokens uniformly from the V words, one
        unknown-word symbol and the end event (a proper distribution); an ungrammatical sentence thus costs about
        log(V + 2) - log(smoothing) / (n + 1) nats per token and is not hidden.
      gen_ppl_grammatical: exp(token-weighted mean NLL) of the grammatical sentences only, exact (nan if none).
    entropy: mean over sentences of the unigram entropy (nats) of the sentence's words (the end event excluded,
    empty sentences count 0). ungrammatical_fraction: fraction of sentences with probability 0.
    """
    if not 0.0 < smoothing < 1.0:
      raise ValueError(f"smoothing must be in (0, 1), got {smoothing}")
    log_uniform_token = -math.log(len(self.vocabulary) + 2)
    nll, tokens, nll_ok, tokens_ok, bad, entropies = 0.0, 0, 0.0, 0, 0, []
    for sentence in sentences:
      words = sentence.split()
      n_tokens = len(words) + 1
      lp = self.log_prob(sentence)
      nll -= np.logaddexp(math.log1p(-smoothing) + lp, math.log(smoothing) + n_tokens * log_uniform_token)
      tokens += n_tokens
      if lp == -math.inf:
        bad += 1
      else:
        nll_ok -= lp
        tokens_ok += n_tokens
      entropies.append(_unigram_entropy(words))
    if not entropies:
      raise ValueError("gen_ppl_and_entropy needs at least one sentence")
    return {
        "gen_ppl": math.exp(nll / tokens),
        "gen_ppl_grammatical": math.exp(nll_ok / tokens_ok) if tokens_ok else math.nan,
        "entropy": float(np.mean(entropies)),
        "ungrammatical_fraction": bad / len(entropies),
        "num_sentences": len(entropies),
    }


class SyntheticLanguage(HiddenMarkovLanguage):
  """The project's English-like language (module docstring); deterministic for a seed.

  Args:
    seed: fixes word and branch probabilities (the grammar and vocabulary are the same for all seeds).
    words_per_class: if set, keep only the first k words of every word class (a smaller, easier language;
      classes keep their most common words first). None: the full vocabulary (399 words; words_per_class=3 gives 156).
  """

  def __init__(self, seed: int, words_per_class: int | None = None):
    if words_per_class is not None and words_per_class < 1:
      raise ValueError(f"words_per_class must be >= 1 or None, got {words_per_class}")
    self.seed = seed
    super().__init__(*_english_grammar(seed, words_per_class))


class SyntheticTranslation:
  """The hidden rule of the synthetic translation task: a sentence of the English-like language -> its translation.

  Two steps, both fixed (the same for every seed and vocabulary size):
    1. reordering: every noun is moved in front of the adjectives right before it, which then follow it in mirror
       order ("the big red ball" -> "the ball red big"; adjectives after a copula stay);
    2. word-by-word mapping: every word is replaced by its target word, three consonant-vowel syllables
       ("ball" -> e.g. "kotiru"), distinct for distinct words and never a word of the source language.

  Attributes:
    source_vocabulary: the language's words.
    target_of: source word -> target word, for every source word.
    vocabulary: source words then target words (what a word tokenizer of the task must cover).
  """

  def __init__(self, source_vocabulary: Sequence[str]):
    self.source_vocabulary = list(source_vocabulary)
    self.target_of = {w: target_word(w) for w in self.source_vocabulary}
    targets = list(self.target_of.values())
    if len(set(targets)) != len(targets) or set(targets) & set(self.source_vocabulary):
      raise ValueError("the translation's target words must be distinct and unlike every source word")
    self.vocabulary = self.source_vocabulary + targets

  def translate(self, sentence: str) -> str:
    """The translation of a whitespace-separated sentence (every word must be in the source vocabulary)."""
    return " ".join(self.target_of[w] for w in reorder(sentence.split()))


def reorder(words: Sequence[str]) -> list[str]:
  """The translation rule's word order: each run of adjectives followed by a noun is reversed, noun first."""
  out, run = [], []
  for w in words:
    if w in _ADJECTIVE_FORMS:
      run.append(w)
      continue
    out.extend([w, *reversed(run)] if w in _NOUN_FORMS else [*run, w])
    run = []
  return out + run


def target_word(word: str) -> str:
  """The translation rule's target word for a source word (module constants `_TRANSLATION_SEED`, `_SYLLABLES...`)."""
  rng = np.random.default_rng([_TRANSLATION_SEED, zlib.crc32(word.encode())])
  return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(_SYLLABLES_PER_WORD))


_NOUN_FORMS = frozenset(form for pairs in _NOUNS.values() for pair in pairs for form in pair)
_ADJECTIVE_FORMS = frozenset(a for first, second in _ADJECTIVES.values() for a in first + second)


def _sparse_categorical(p: np.ndarray) -> tuple[list[float], list[int]]:
  """(cumulative sums, indices) of the nonzero entries of a probability vector, for `_draw`."""
  nonzero = np.flatnonzero(p)
  return np.cumsum(p[nonzero]).tolist(), nonzero.tolist()


def _draw(categorical: tuple[list[float], list[int]], rng: np.random.Generator) -> int:
  """An index drawn from a `_sparse_categorical` distribution (pure Python: this runs once per word)."""
  cumulative, indices = categorical
  return indices[min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(indices) - 1)]


def _unigram_entropy(tokens: Sequence[str]) -> float:
  if not tokens:
    return 0.0
  counts = np.array(list(collections.Counter(tokens).values()), np.float64)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def _longest_path(edges: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int | None:
  """Most states on a start-to-end path of the graph `edges` (K, K) bool, or None if a cycle is reachable."""
  k = len(starts)
  indegree = edges.sum(0)
  order, frontier = [], [i for i in range(k) if indegree[i] == 0]
  while frontier:
    i = frontier.pop()
    order.append(i)
    for j in np.flatnonzero(edges[i]):
      indegree[j] -= 1
      if indegree[j] == 0:
        frontier.append(j)
  if len(order) < k:
    return None
  longest = np.where(starts, 1, -k - 1)  # states on the longest path from a start state to here
  for i in order:
    for j in np.flatnonzero(edges[i]):
      longest[j] = max(longest[j], longest[i] + 1)
  return int(longest[ends].max())


class _GrammarBuilder:
  """Collects named states (word weights) and weighted branches, then normalises them into HMM arrays."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._words: dict[str, dict[str, float]] = {}
    self._branches: dict[str, dict[str, float]] = collections.defaultdict(dict)

  def state(self, name: str, words: Mapping[str, float]) -> str:
    self._words[name] = dict(words)
    return name

  def branch(self, source: str, weights: Mapping[str, float], scale: float = 1.0):
    """Adds branches source -> target (a state, _END) with the given weights times `scale`."""
    for target, w in weights.items():
      self._branches[source][target] = self._branches[source].get(target, 0.0) + w * scale

  def build(self):
    """(vocabulary, start, transition, end, emission, state_names) with noise applied and dead states removed."""
    branches = {s: {t: w * math.exp(_NOISE * self._rng.standard_normal()) for t, w in out.items()}
                for s, out in self._branches.items()}
    alive = {s for s, words in self._words.items() if words}
    changed = True
    while changed:  # drop states without words and states from which no path reaches the end
      keep = {s for s in alive if any(t == _END or t in alive for t in branches.get(s, {}))}
      changed, alive = keep != alive, keep
    names = [s for s in self._words if s in alive]
    index = {s: i for i, s in enumerate(names)}
    vocabulary = sorted({w for s in names for w in self._words[s]})
    word_id = {w: i for i, w in enumerate(vocabulary)}
    k = len(names)
    weights = np.zeros((k + 1, k + 1))  # row/column k: start/end
    for source, out in branches.items():
      row = k if source == _START else index.get(source)
      if row is None:
        continue
      for target, w in out.items():
        col = k if target == _END else index.get(target)
        if col is not None:
          weights[row, col] += w
    weights /= weights.sum(1, keepdims=True)
    emission = np.zeros((k, len(vocabulary)))
    for s in names:
      for w, p in self._words[s].items():
        emission[index[s], word_id[w]] += p
    emission /= emission.sum(1, keepdims=True)
    return vocabulary, weights[k, :k], weights[:k, :k], weights[:k, k], emission, names


def _english_grammar(seed: int, words_per_class: int | None):
  """HMM arrays of the English-like grammar (module docstring)."""
  rng = np.random.default_rng(seed)
  zipf_cache: dict[tuple, np.ndarray] = {}

  def zipf(key: tuple, n: int) -> np.ndarray:
    """Zipf weights (list order) with seeded noise for the n members of a word class, the same for every use."""
    if key not in zipf_cache:
      noise = np.exp(_NOISE * rng.standard_normal(n))
      zipf_cache[key] = noise / np.arange(1.0, n + 1.0) ** _ZIPF_EXPONENT
    return zipf_cache[key]

  def words(key: tuple, members: Sequence, form=lambda m: m) -> dict[str, float]:
    members = list(members)[:words_per_class]
    out: dict[str, float] = {}
    for member, w in zip(members, zipf(key, len(members))):
      out[form(member)] = out.get(form(member), 0.0) + w
    return out

  g = _GrammarBuilder(rng)

  def noun_phrase(prefix: str, cls: str, num: str, max_adjectives: int, after: Mapping[str, float]) -> str:
    """determiner [adjective [adjective]] noun, then `after`; returns the determiner state."""
    number = 0 if num == "sg" else 1
    det = g.state(f"{prefix}.det", words(("det", num), _DETERMINERS[num]))
    noun = g.state(f"{prefix}.noun", words(("noun", cls), _NOUNS[cls], lambda pair: pair[number]))
    g.branch(noun, after)
    first, second = _ADJECTIVES[cls]
    if max_adjectives == 1:
      adj = g.state(f"{prefix}.adj", words(("adj", cls), first + second))
      g.branch(det, {adj: _DET_NEXT["adj1"] + _DET_NEXT["adj2"], noun: _DET_NEXT["noun"]})
      g.branch(adj, {noun: 1.0})
      return det
    adj1 = g.state(f"{prefix}.adj1", words(("adj1", cls), first))
    adj2 = g.state(f"{prefix}.adj2", words(("adj2", cls), second))
    g.branch(det, {adj1: _DET_NEXT["adj1"], adj2: _DET_NEXT["adj2"], noun: _DET_NEXT["noun"]})
    g.branch(adj1, {adj2: _ADJ1_NEXT["adj2"], noun: _ADJ1_NEXT["noun"]})
    g.branch(adj2, {noun: 1.0})
    return det

  # Sentence ends: an optional adverb that agrees with the tense.
  endings = {}
  for tense in _TENSES:
    adverb = g.state(f"adverb.{tense}", words(("adverb", tense), _ADVERBS[tense]))
    g.branch(adverb, {_END: 1.0})
    endings[tense] = {adverb: _ADVERB_PROB, _END: 1.0 - _ADVERB_PROB}

  # Objects: noun phrases per (noun class, number, tense); people also as names and pronouns.
  by_class = {}
  for tense in _TENSES:
    for cls in _NOUNS:
      share = _OBJECT_SHARES["noun_phrase"] if cls == "person" else 1.0
      by_class[cls, tense] = {noun_phrase(f"object.{cls}.{num}.{tense}", cls, num, 2, endings[tense]): share * p
                              for num, p in _NUMBERS.items()}
    name = g.state(f"object.name.{tense}", words(("name",), _NAMES))
    pronoun = g.state(f"object.pronoun.{tense}", words(("object_pronoun",), _OBJECT_PRONOUNS))
    g.branch(name, endings[tense])
    g.branch(pronoun, endings[tense])
    by_class["person", tense].update({name: _OBJECT_SHARES["name"], pronoun: _OBJECT_SHARES["pronoun"]})
  objects = {(kind, tense): {s: w * p for cls, w in classes.items() for s, p in by_class[cls, tense].items()}
             for kind, classes in _OBJECTS.items() for tense in _TENSES}

  # Verb phrases per subject (class, number): state -> weight.
  verb_phrases = {}
  for cls, kinds in _VERB_PHRASES.items():
    for num in _NUMBERS:
      entry = {}
      for tense, p_tense in _TENSES.items():
        for kind, p_kind in kinds.items():
          key = f"{cls}.{num}.{tense}.{kind}"
          if kind == "copula":
            copula = g.state(f"copula.{key}", {_COPULA[num, tense]: 1.0})
            first, second = _ADJECTIVES[cls]
            adj = g.state(f"copula.adj.{key}", words(("adj", cls), first + second))
            very = g.state(f"copula.very.{key}", {"very": 1.0})
            g.branch(copula, {very: _VERY_PROB, adj: 1.0 - _VERY_PROB})
            g.branch(very, {adj: 1.0})
            g.branch(adj, endings[tense])
            entry[copula] = p_tense * p_kind
            continue
          form = {"sg": 0, "pl": 1}[num] if tense == "present" else 2
          verbs = [v for v in _VERBS[kind] if cls in v[3]]
          verb = g.state(f"verb.{key}", words(("verb", kind, cls), verbs, lambda v: v[form]))
          g.branch(verb, endings[tense] if kind is None else objects[kind, tense])
          entry[verb] = p_tense * p_kind
      verb_phrases[cls, num] = entry

  # Subjects: noun phrase with an optional prepositional phrase, a name, or a pronoun.
  pp_share = _PP_PROB / (1.0 - _PP_PROB) / len(_PREPOSITIONS)  # relative to the verb phrases' total weight 1
  for cls, p_cls in _SUBJECT_CLASSES.items():
    for num, p_num in _NUMBERS.items():
      after_noun = dict(verb_phrases[cls, num])
      for pp_cls, prepositions in _PREPOSITIONS.items():
        prep = g.state(f"subject.{cls}.{num}.prep.{pp_cls}", words(("prep", pp_cls), prepositions))
        g.branch(prep, {noun_phrase(f"subject.{cls}.{num}.pp.{pp_cls}.{pp_num}", pp_cls, pp_num, 1,
                                    verb_phrases[cls, num]): p for pp_num, p in _NUMBERS.items()})
        after_noun[prep] = pp_share
      subject = noun_phrase(f"subject.{cls}.{num}", cls, num, 2, after_noun)
      g.branch(_START, {subject: _SUBJECT_SHARES["noun_phrase"] * p_cls * p_num})
  name = g.state("subject.name", words(("name",), _NAMES))
  g.branch(name, verb_phrases["person", "sg"])
  g.branch(_START, {name: _SUBJECT_SHARES["name"]})
  for num, p_num in _NUMBERS.items():
    pronoun = g.state(f"subject.pronoun.{num}", words(("subject_pronoun", num), _SUBJECT_PRONOUNS[num]))
    g.branch(pronoun, verb_phrases["person", num])
    g.branch(_START, {pronoun: _SUBJECT_SHARES["pronoun"] * p_num})
  return g.build()
