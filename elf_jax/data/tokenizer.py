"""Tokenizers: a word-level tokenizer for the synthetic language, and loading of Hugging Face tokenizers.

Both follow T5's conventions: pad id 0, EOS id 1, and encoding appends EOS unless called with
`add_special_tokens=False` — which is how the pipeline tokenizes raw text, as the reference does (its JSONL loader
and its recipe for pre-tokenizing data), so tokenized text carries no EOS. Under config.flow.pad_token = "eos" the
model learns EOS from the padding.
"""
import os

import tokenizers
from tokenizers import models, pre_tokenizers, processors
import transformers

from elf_jax import hub
from elf_jax.config import ConfigError
from elf_jax.data import synthetic

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 (T5's names and pad / EOS ids)


def build_word_tokenizer(vocabulary: list[str], save_dir: str | None = None
                        ) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer: ids 0, 1, 2 = pad, EOS, unknown; word i of `vocabulary` = id 3 + i.

  Text is split on whitespace only; encoding appends EOS (not with add_special_tokens=False); decoding joins words
  with single spaces.

  Args:
    vocabulary: distinct words without whitespace.
    save_dir: if given, the tokenizer is also written there with `save_pretrained` (loadable by AutoTokenizer).
  """
  specials = [PAD, EOS, UNK]
  bad = [w for w in vocabulary if not w or w.split() != [w] or w in specials]
  if bad or len(set(vocabulary)) != len(vocabulary):
    raise ValueError(f"vocabulary words must be distinct, non-empty, without whitespace and not in {specials}; "
                     f"offending: {bad[:5] or 'duplicates'}")
  vocab = {w: i for i, w in enumerate(specials + list(vocabulary))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                     special_tokens=[(EOS, vocab[EOS])])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
  if save_dir:
    hf.save_pretrained(save_dir)
  return hf


def decode(tokenizer: transformers.PreTrainedTokenizerBase, rows, *, clean_up_tokenization_spaces: bool) -> list[str]:
  """Token-id rows (any int sequences) -> texts, special tokens skipped, as decoded (no whitespace stripped).

  clean_up_tokenization_spaces (config.data.clean_up_tokenization_spaces) is always passed, so that the text does not
  depend on the transformers version's default (True before 4.45, False in 5).
  """
  return [tokenizer.decode([int(i) for i in row], skip_special_tokens=True,
                           clean_up_tokenization_spaces=clean_up_tokenization_spaces) for row in rows]


def load_tokenizer(name_or_path: str,
                   language: synthetic.HiddenMarkovLanguage | synthetic.SyntheticTranslation | None = None
                   ) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer named by config.data.tokenizer.

  Args:
    name_or_path: "synthetic" (word tokenizer of `language.vocabulary`), a local directory with a saved Hugging
      Face tokenizer, or a hub id (`org/name`, or `org/name/sub` for a folder of it; needs network access or the
      Hugging Face cache).
    language: the synthetic language, or the synthetic translation task (its vocabulary holds the words of both
      languages); required for "synthetic".
  """
  if name_or_path == "synthetic":
    if language is None:
      raise ValueError('config.data.tokenizer = "synthetic" needs the SyntheticLanguage: pass language=...')
    return build_word_tokenizer(language.vocabulary)
  repo = None if os.path.isdir(name_or_path) else hub.hub_id(name_or_path)
  try:
    if repo and repo[1]:  # org/name/sub: the tokenizer in a folder of a repository
      return transformers.AutoTokenizer.from_pretrained(repo[0], subfolder=repo[1], trust_remote_code=False)
    return transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)  # never custom code
  except (OSError, ValueError) as e:
    if "trust_remote_code" in str(e):
      raise ConfigError(f"data.tokenizer={name_or_path!r} needs custom code from its folder (an auto_map in "
                        "tokenizer_config.json), which elf_jax never runs; use a tokenizer saved with a built-in class "
                        "(tokenizer.json, e.g. written by save_pretrained)") from e
    where = "local directory" if os.path.isdir(name_or_path) else "hub id (no such local directory)"
    raise ConfigError(
        f"data.tokenizer={name_or_path!r}: cannot load this tokenizer (read as a {where}; {type(e).__name__}). "
        "Offline? Set --config.data.tokenizer=DIR, a saved Hugging Face tokenizer (tokenizer.json, e.g. written by "
        'save_pretrained), or "synthetic" with the synthetic language.') from e
