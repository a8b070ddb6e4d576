"""Tests for elf_jax.weights.published: the reference tiny-ELF fixture's msgpack and orbax checkpoints load into the
stacked blocks, a wrapped `params` level is stripped, a mismatch with the expected shapes names every bad leaf."""
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.model import elf
from elf_jax.weights import published

from tests.conftest import assert_trees_equal, fixture_config


def test_fixture_msgpack_and_orbax_agree(tiny_fixture_dir):
  """Both published layouts load into the stacked blocks; unstacked, that is exactly the file's tree."""
  cfg = fixture_config(tiny_fixture_dir)
  width, depth = cfg["hidden_size"], cfg["depth"]
  raw = flax.serialization.msgpack_restore((tiny_fixture_dir / "checkpoint_7").read_bytes())
  for which, key in (("raw", "params"), ("ema", "ema_params1")):
    from_msgpack = published.load_published_elf(tiny_fixture_dir / "checkpoint_7", which=which)
    from_orbax = published.load_published_elf(tiny_fixture_dir / "orbax_checkpoint_7", which=which)
    assert_trees_equal(from_msgpack, from_orbax)
    assert_trees_equal(elf.unstack_blocks(from_msgpack), raw[key])
    assert_trees_equal(elf.stack_blocks(raw[key]), from_msgpack)
    assert from_msgpack["mode_tokens"].shape == (1, cfg["num_model_mode_tokens"], width)
    assert from_msgpack["blocks"]["attn"]["qkv"]["kernel"].shape == (depth, width, 3 * width)
    assert not [k for k in from_msgpack if k.startswith("blocks_")]
    np.testing.assert_array_equal(from_msgpack["blocks"]["mlp"]["w3"]["kernel"][depth - 1],
                                  raw[key][f"blocks_{depth - 1}"]["mlp"]["w3"]["kernel"])
  ema = published.load_published_elf(tiny_fixture_dir / "orbax_checkpoint_7", which="ema")
  raw_params = published.load_published_elf(tiny_fixture_dir / "orbax_checkpoint_7", which="raw")
  for e, r in zip(jax.tree.leaves(ema), jax.tree.leaves(raw_params)):
    np.testing.assert_allclose(e, 0.9 * r, rtol=1e-6)


def test_fixture_wrapped_params_level_is_stripped(tmp_path, tiny_fixture_dir):
  raw = flax.serialization.msgpack_restore((tiny_fixture_dir / "checkpoint_7").read_bytes())
  wrapped = tmp_path / "wrapped.msgpack"
  wrapped.write_bytes(flax.serialization.msgpack_serialize({"params": {"params": raw["params"]}}))
  assert_trees_equal(published.load_published_elf(wrapped, which="raw"), elf.stack_blocks(raw["params"]))


def test_fixture_expected_mismatch_names_every_bad_leaf(tiny_fixture_dir):
  """`expected` in either layout (stacked, as the model's init; or published); problems are named per block."""
  cfg = fixture_config(tiny_fixture_dir)
  width, extra_block = cfg["hidden_size"], f"blocks_{cfg['depth']}"  # one block more than the checkpoint has
  params = published.load_published_elf(tiny_fixture_dir / "checkpoint_7")
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert_trees_equal(published.load_published_elf(tiny_fixture_dir / "checkpoint_7", expected=stacked), params)
  stacked["blocks"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1,) + x.shape[1:], x.dtype),
                                   stacked["blocks"])
  with pytest.raises(ValueError, match=f"missing: {extra_block}/norm1/weight"):
    published.load_published_elf(tiny_fixture_dir / "checkpoint_7", expected=stacked)
  expected = jax.eval_shape(elf.unstack_blocks, params)
  params = elf.unstack_blocks(params)
  w3 = params["blocks_0"]["mlp"]["w3"]["kernel"].shape
  wrong_w3 = (w3[0] + 1,) + w3[1:]
  expected["blocks_0"]["mlp"]["w3"]["kernel"] = jax.ShapeDtypeStruct(wrong_w3, jnp.float32)
  del expected["unembed_bias"]
  expected[extra_block] = {"norm1": {"weight": jax.ShapeDtypeStruct((width,), jnp.float32)}}
  with pytest.raises(ValueError) as err:
    published.load_published_elf(tiny_fixture_dir / "orbax_checkpoint_7", expected=expected)
  message = str(err.value)
  assert "3 problems" in message
  assert f"missing: {extra_block}/norm1/weight" in message
  assert "extra: unembed_bias" in message
  assert f"mis-shaped: blocks_0/mlp/w3/kernel checkpoint {w3} vs expected {wrong_w3}" in message


def test_load_params_from_a_published_checkpoint(tiny_fixture_dir):
  assert_trees_equal(published.load_params_from(tiny_fixture_dir / "checkpoint_7"),
               published.load_published_elf(tiny_fixture_dir / "orbax_checkpoint_7", which="ema"))
