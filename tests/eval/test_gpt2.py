"""Flax GPT-2 against Hugging Face's PyTorch GPT2LMHeadModel, on a tiny random model built offline."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from elf_jax.config import ConfigError
from elf_jax.eval import gpt2


@pytest.fixture(scope="module")
def loaded(tiny_gpt2):
  return gpt2.load_hf_gpt2(str(tiny_gpt2.directory))


def _torch_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.numpy()


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_config_from_hf(tiny_gpt2, loaded):
  config, _ = loaded
  assert config == gpt2.GPT2Config(vocab_size=len(tiny_gpt2.tokenizer), n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, n_inner=None, layer_norm_epsilon=1e-5, activation_function="gelu_new")
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
    gpt2.GPT2Config.from_hf_dict({"scale_attn_by_inverse_layer_idx": True})


def test_logits_match_torch_with_and_without_padding(tiny_gpt2, loaded):
  config, params = loaded
  model = gpt2.GPT2LMHeadModel(config)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (3, 20))
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  assert got.dtype == np.float32 and got.shape == (3, 20, config.vocab_size)
  np.testing.assert_allclose(got, _torch_logits(tiny_gpt2.torch_model, ids), atol=1e-4, rtol=1e-4)

  lengths = np.array([20, 13, 1])
  mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int64)
  padded = np.where(mask == 1, ids, 0)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(padded), jnp.asarray(mask)))
  want = _torch_logits(tiny_gpt2.torch_model, padded, mask)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(got[row, :length], want[row, :length], atol=1e-4, rtol=1e-4)
    alone = _torch_logits(tiny_gpt2.torch_model, ids[row:row + 1, :length])[0]  # padding changes nothing
    np.testing.assert_allclose(got[row, :length], alone, atol=1e-4, rtol=1e-4)


def test_hidden_states_are_hugging_faces_last(tiny_gpt2, loaded):
  """hidden_states=True: the final layer norm's output, Hugging Face's hidden_states[-1] (what MAUVE featurizes)."""
  config, params = loaded
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 9))
  got = np.asarray(gpt2.GPT2LMHeadModel(config).apply({"params": params}, jnp.asarray(ids), hidden_states=True))
  with torch.no_grad():
    want = tiny_gpt2.torch_model(torch.tensor(ids), output_hidden_states=True).hidden_states[-1].numpy()
  assert got.shape == (2, 9, config.n_embd)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_close_to_float32(loaded):
  config, params = loaded
  ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)))
  full = gpt2.GPT2LMHeadModel(config).apply({"params": params}, ids)
  half = gpt2.GPT2LMHeadModel(config, dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert half.dtype == jnp.float32
  assert 0 < float(jnp.abs(half - full).max()) < 0.05 * float(jnp.abs(full).max())


def test_pytorch_bin_with_legacy_names_loads_the_same(tiny_gpt2, loaded, tmp_path):
  """Original GPT-2 .bin layout: no 'transformer.' prefix, causal-mask buffers, tied lm_head stored."""
  state = {k.removeprefix("transformer."): v for k, v in tiny_gpt2.torch_model.state_dict().items()}
  state["lm_head.weight"] = tiny_gpt2.torch_model.lm_head.weight.detach().clone()
  for i in range(2):
    state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
  torch.save(state, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((tiny_gpt2.directory / "config.json").read_text())
  _, params = gpt2.load_hf_gpt2(str(tmp_path))
  want = _flat(loaded[1])
  got = _flat(params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_sharded_safetensors_load_the_same(tiny_gpt2, loaded, tmp_path):
  state = safetensors.numpy.load_file(tiny_gpt2.directory / "model.safetensors")
  names = sorted(state)
  weight_map = {}
  for shard, part in enumerate((names[::2], names[1::2])):
    file = f"model-0000{shard + 1}-of-00002.safetensors"
    safetensors.numpy.save_file({k: state[k] for k in part}, tmp_path / file)
    weight_map.update({k: file for k in part})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text((tiny_gpt2.directory / "config.json").read_text())
  _, params = gpt2.load_hf_gpt2(str(tmp_path))
  want, got = _flat(loaded[1]), _flat(params)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_mismatched_checkpoint_lists_every_problem(tiny_gpt2, loaded):
  config, _ = loaded
  state = {k: v.numpy() for k, v in tiny_gpt2.torch_model.state_dict().items()}
  del state["transformer.h.1.mlp.c_fc.bias"]
  state["transformer.h.0.attn.c_proj.weight"] = state["transformer.h.0.attn.c_proj.weight"].T[:, :16]
  state["transformer.h.2.ln_1.weight"] = np.ones(32, np.float32)
  state["lm_head.weight"] = state["transformer.wte.weight"] + 1
  with pytest.raises(ValueError) as err:
    gpt2.convert_hf_state_dict(config, state)
  message = str(err.value)
  for needle in ("missing weight for h_1/mlp/c_fc/bias", "mis-shaped weight transformer.h.0.attn.c_proj.weight",
                 "unexpected weight transformer.h.2.ln_1.weight", "lm_head.weight differs"):
    assert needle in message
  assert "h_0/attn/c_proj" not in message  # a mis-shaped weight is not also reported missing


def test_missing_inputs_give_clear_errors(tiny_gpt2, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gpt2.load_hf_gpt2(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no GPT-2 weights"):
    gpt2.read_hf_state_dict(tmp_path)
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(ConfigError, match="--config.eval.gpt2=DIR"):
    gpt2.load_hf_gpt2("no-such-org/no-such-gpt2")
  torch.save({}, tmp_path / "pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="pip install torch"):
    gpt2.read_hf_state_dict(tmp_path)
