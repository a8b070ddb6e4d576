"""The tiny GPT-2 (byte-level BPE tokenizer and a seeded random model, built offline) shared by the tests of the
scorers, and the texts they score."""
import dataclasses
import pathlib

import pytest
import tokenizers
import torch
import transformers

EOS = "<|endoftext|>"
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A flow of words, embedded in a latent space, becomes text again.",
    "Perplexity measures how surprised a language model is by each next token.",
    "Numbers like 1024 and 3.14 appear too; so do commas, colons: and dashes - here.",
]


@dataclasses.dataclass
class TinyGPT2:
  directory: pathlib.Path  # save_pretrained output: model.safetensors, config.json, tokenizer files
  torch_model: transformers.GPT2LMHeadModel
  tokenizer: transformers.PreTrainedTokenizerBase


def build_tiny_gpt2(directory: pathlib.Path) -> TinyGPT2:
  """A byte-level BPE GPT-2 tokenizer trained on a few sentences and a seeded random GPT-2 of matching vocab."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(_CORPUS * 4, vocab_size=320, special_tokens=[EOS], show_progress=False)
  fast = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer,  # pylint: disable=protected-access
                                        bos_token=EOS, eos_token=EOS, unk_token=EOS)
  fast.save_pretrained(directory)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.3,  # O(1) activations: gelu variants differ by > 1e-4
                                   bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm parameters, so their import is checked too
    for name, p in model.named_parameters():
      if ".ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return TinyGPT2(directory, model, tokenizer)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> TinyGPT2:
  return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


MAX_LENGTH = 24
TEXTS = [
    "",
    " \n ",  # whitespace only: empty too
    "The fox.",
    "The quick brown fox jumps over the lazy dog.",
    f"A flow{EOS} of words{EOS} embedded.",  # EOS inside the text: only the first counts
    f"{EOS}Perplexity measures surprise.",  # first EOS at position 0 (context only): the appended one is a later one
    "Numbers like 1024 and 3.14 appear too; so do commas, colons: and dashes - here. " * 3,  # > MAX_LENGTH
    "Unseen bytes: é, ß, 漢字 ✓",
]
