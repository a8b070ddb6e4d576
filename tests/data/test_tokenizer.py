"""Tokenizers: the synthetic language's word tokenizer (ids, round trip, saved and reloaded), the one-line errors, and
a tokenizer folder with custom code, never run."""
import json

import numpy as np
import pytest
import transformers

from elf_jax.config import ConfigError
from elf_jax.data import tokenizer as tokenizer_lib

from tests.data.conftest import encode


def test_word_tokenizer_ids_and_round_trip(language, tok, tmp_path):
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert len(tok) == len(language.vocabulary) + 3
  for sentence in language.sample(20, np.random.default_rng(0)):
    ids = tok(sentence)["input_ids"]
    assert ids[-1] == 1 and len(ids) == len(sentence.split()) + 1  # T5's convention: EOS appended by default
    assert ids[:-1] == [3 + language.vocabulary.index(w) for w in sentence.split()] == encode(tok, sentence)
    assert tok.decode(ids, skip_special_tokens=True) == sentence
  assert tok("the zebra")["input_ids"] == [3 + language.vocabulary.index("the"), 2, 1]
  tokenizer_lib.build_word_tokenizer(language.vocabulary, save_dir=str(tmp_path))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded("the cat sees the dog")["input_ids"] == tok("the cat sees the dog")["input_ids"]
  assert encode(reloaded, "the cat sees the dog") == encode(tok, "the cat sees the dog")
  assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)


def test_load_tokenizer_errors():
  with pytest.raises(ValueError, match="language"):
    tokenizer_lib.load_tokenizer("synthetic")
  with pytest.raises(ConfigError, match="--config.data.tokenizer=DIR"):
    tokenizer_lib.load_tokenizer("/nonexistent/tokenizer_dir")
  with pytest.raises(ValueError, match="distinct"):
    tokenizer_lib.build_word_tokenizer(["a", "a"])


def test_a_tokenizer_folder_with_custom_code_never_runs_it(tmp_path):
  """A tokenizer_config.json whose auto_map points at code in the folder: refused with one message, the code never
  imported, even with "y" piped to a prompt (without trust_remote_code=False transformers asks on stdin)."""
  import subprocess
  import sys
  tokenizer_lib.build_word_tokenizer(["a", "b"], save_dir=str(tmp_path))
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
  del config["tokenizer_class"]  # no local class named: transformers would offer to run the folder's code
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  marker = tmp_path / "ran"
  (tmp_path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "from transformers import PreTrainedTokenizerFast as CustomTokenizer\n")
  code = f"from elf_jax.data import tokenizer; tokenizer.load_tokenizer({str(tmp_path)!r})"
  result = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=300)
  assert not marker.exists()
  assert result.returncode == 1 and "needs custom code from its folder" in result.stderr.splitlines()[-1]
