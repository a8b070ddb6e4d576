r"""Prefix completion against free sampling on a model of the synthetic language (the README's figures).

  python examples/completions.py --workdir=runs/tiny [--num=500 --prefix_words=1,2,3]

Prefixes are the first k words of held-out true sentences that have more than k words; `Model.complete` holds their
clean latents at every step and samples the rest. A completion counts as grammatical when prefix + continuation has
non-zero probability under the language; the free samples of the same model, with the same sampling settings, are
the comparison.
"""
from absl import app, flags

import elf_jax
from elf_jax.data.synthetic import HiddenMarkovLanguage
from elf_jax.eval import gen_ppl
from elf_jax.run import generate

_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "a workdir (or checkpoint) of a model of the synthetic language")
_NUM = flags.DEFINE_integer("num", 500, "samples, and prefixes per prefix length")
_PREFIX_WORDS = flags.DEFINE_list("prefix_words", ["1", "2", "3"], "prefix lengths k, in words")


def figures(language: HiddenMarkovLanguage, texts: list[str]) -> str:
  """One table row: ungrammatical share, Gen. PPL and entropy under the true language, words per sentence."""
  kept = gen_ppl.nonempty(texts)
  f = language.gen_ppl_and_entropy(kept)
  words = sum(len(t.split()) for t in kept) / max(len(kept), 1)
  return (f"{100 * f['ungrammatical_fraction']:12.1f}%  {f['gen_ppl']:8.3f}  {f['entropy']:7.3f}  {words:5.2f}  "
          f"{len(texts) - len(kept):5d}")


def main(argv):
  del argv
  model = elf_jax.load(_WORKDIR.value)
  language = model.experiment.language
  if language is None:
    raise app.UsageError(f"{_WORKDIR.value} is not a model of the synthetic language (data.tokenizer=synthetic): "
                         "grammaticality needs the true language")
  num = _NUM.value
  held_out = generate.held_out_texts(model.experiment, 20 * num)
  rows = {"true sentences": figures(language, held_out[:num]),
          "free samples": figures(language, model.generate(num).texts)}
  for k in map(int, _PREFIX_WORDS.value):
    sentences = [s for s in held_out if len(s.split()) > k][:num]
    prefixes = [" ".join(s.split()[:k]) for s in sentences]
    completed = model.complete(prefixes).full_texts
    rows[f"completions of {k}-word prefixes"] = figures(language, completed)
    examples = [f"    [{prefix}] {text[len(prefix):].strip()}" for prefix, text in zip(prefixes, completed)]
    rows[f"completions of {k}-word prefixes"] += "\n" + "\n".join(examples[:3])
  print(f"{'':34}ungrammatical  Gen. PPL  entropy  words  empty")
  for label, row in rows.items():
    print(f"{label:<34}{row}")


if __name__ == "__main__":
  app.run(main)
