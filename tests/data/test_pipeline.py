"""The grain pipeline: rows equal the reference's collate (fixture reference_elf_train); padding, EOS, packing,
conditional rows, pre-tokenized ids, iterator state, shuffling, epochs and process shards."""
import json

import numpy as np
import pytest

from elf_jax.config import ConfigError, validate
from elf_jax.data import pipeline, sources, synthetic
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.model.t5_encoder import make_encoder_mask

from tests.conftest import fixture_config
from tests.data.conftest import S, data_config, encode, save_hf_dataset


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def reference_train(train_fixture_dir):
  """(config.json, reference.npz arrays) of the reference_elf_train fixture."""
  return fixture_config(train_fixture_dir), np.load(train_fixture_dir / "reference.npz")


@pytest.mark.parametrize("case", ["uncond_pad", "cond_eos"])
def test_rows_equal_the_reference_collate(reference_train, case):
  """Layout.row on the token lists fed to the reference's collate gives its input_ids, attention_mask (= valid)
  and cond_seq_mask exactly, and the project's encoder mask of (valid, cond_mask) its encoder_attention_mask."""
  cfg, ref = reference_train
  recipe = cfg["cases"][case]
  layout = pipeline.Layout(max_length=cfg["dims"]["S"], max_condition_length=recipe["max_input_length"] or 0,
                           pad_id=cfg["pad_id"], eos_id=cfg["eos_id"], pad_with_eos=recipe["pad_token"] == "eos",
                           encode_padding=False)
  targets = ref[f"{case}/target_lists"]
  conditions = ref[f"{case}/condition_lists"] if recipe["max_input_length"] else [None] * len(targets)
  strip = lambda ids: None if ids is None else ids[ids >= 0]  # -1 = no token
  rows = [layout.row(strip(t), strip(c)) for t, c in zip(targets, conditions)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  np.testing.assert_array_equal(batch["ids"], ref[f"{case}/input_ids"])
  np.testing.assert_array_equal(batch["valid"], ref[f"{case}/attention_mask"].astype(bool))
  np.testing.assert_array_equal(batch["cond_mask"], ref[f"{case}/cond_seq_mask"].astype(bool))
  # The reference's loss mask (its train step): attention_mask ("pad") or all ones ("eos"), times 1 - cond_seq_mask.
  learned = np.ones_like(batch["valid"]) if layout.pad_with_eos else ref[f"{case}/attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["loss_mask"], learned & ~ref[f"{case}/cond_seq_mask"].astype(bool))
  encoder_mask = make_encoder_mask(batch["valid"], batch["cond_mask"] if conditions[0] is not None else None)
  np.testing.assert_array_equal(np.asarray(encoder_mask), ref[f"{case}/encoder_attention_mask"].astype(bool))


def test_unconditional_pad_mode_rows(language, tok):
  c = data_config()
  batches = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 2)
  source = sources.make_source(c.data, "train", language)
  for k, b in enumerate(batches):
    assert b["ids"].shape == (4, S) and b["ids"].dtype == np.int32
    for name in ("valid", "cond_mask", "loss_mask"):
      assert b[name].shape == (4, S) and b[name].dtype == bool
    assert not b["cond_mask"].any() and (b["loss_mask"] == b["valid"]).all()
    for row in range(4):
      expected = encode(tok, source[4 * k + row]["text"])  # no EOS appended
      n = len(expected)
      assert b["ids"][row, :n].tolist() == expected and (b["ids"][row, n:] == 0).all()
      assert b["valid"][row].tolist() == [True] * n + [False] * (S - n)


def test_unconditional_eos_mode_and_truncation(language, tok):
  """EOS padding is learned (loss mask) but not valid; a cut row ends where it is cut (no EOS forced)."""
  c = data_config(max_length=5)
  c.flow.pad_token = "eos"
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  source = sources.make_source(c.data, "train", language)
  assert b["loss_mask"].all() and not b["cond_mask"].any()
  lengths = []
  for row in range(4):
    expected = encode(tok, source[row]["text"])[:5]
    lengths.append(len(expected))
    assert b["ids"][row].tolist() == expected + [1] * (5 - len(expected))
    assert b["valid"][row].tolist() == [True] * len(expected) + [False] * (5 - len(expected))
  assert min(lengths) < 5 and max(lengths) == 5 and b["ids"][lengths.index(5), -1] != 1  # both cases are covered


def test_encode_padding_makes_the_eos_padding_valid(language, tok):
  """flow.encode_padding (opt-in): the same ids and loss mask as the EOS mode, every position valid (the encoder
  attends to the padding); without EOS padding it is one config error."""
  c = data_config()
  c.flow.pad_token = "eos"
  official = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  c.flow.encode_padding = True
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  assert not official["valid"].all() and b["valid"].all()
  for key in ("ids", "loss_mask", "cond_mask"):
    np.testing.assert_array_equal(b[key], official[key], err_msg=key)
  c.flow.pad_token = "pad"
  with pytest.raises(ConfigError, match="flow.encode_padding=True needs EOS padding"):
    validate(c)


def test_packing_concatenates_documents(language, tok):
  """Packing (not in the reference): documents, each followed by EOS, concatenated and cut into full rows."""
  c = data_config(packing=True)
  batches = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 2)
  source = sources.make_source(c.data, "train", language)
  stream = [i for r in range(40) for i in encode(tok, source[r]["text"]) + [1]]
  packed = np.concatenate([b["ids"].reshape(-1) for b in batches])
  assert packed.tolist() == stream[:len(packed)]
  assert all(b["valid"].all() and b["loss_mask"].all() and not b["cond_mask"].any() for b in batches)


def _conditional_config(tmp_path, pad_token):
  rows = [{"input": "the cat sees the dog today", "output": "the dog sleeps"},
          {"input": "tom", "output": "the big red ball"},
          {"input": "a b c d e f", "output": "x"},
          {"input": "she runs", "output": "the cat near the park sleeps again today"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  c = data_config(source="jsonl", path=str(tmp_path / "pairs.jsonl"), conditional=True, max_length=8,
              max_condition_length=4)
  c.flow.pad_token = pad_token
  return c, rows


@pytest.mark.parametrize("pad_token", ["pad", "eos"])
def test_conditional_jsonl_rows(tmp_path, tok, pad_token):
  """[condition[:max_condition_length] ; target] cut to S and padded; condition, valid and loss masks."""
  c, rows = _conditional_config(tmp_path, pad_token)
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  pad = 1 if pad_token == "eos" else 0
  for row, record in enumerate(rows):
    cond = encode(tok, record["input"])[:4]
    tokens = (cond + encode(tok, record["output"]))[:8]
    n = len(tokens)
    assert b["ids"][row].tolist() == tokens + [pad] * (8 - n)
    assert b["cond_mask"][row].tolist() == [True] * len(cond) + [False] * (8 - len(cond))
    assert b["valid"][row].tolist() == [True] * n + [False] * (8 - n)
    learned = np.ones(8, bool) if pad_token == "eos" else b["valid"][row]
    assert (b["loss_mask"][row] == (learned & ~b["cond_mask"][row])).all()
  assert not b["valid"].all()  # some rows are padded, and their padding is not valid in either mode


def test_synthetic_translation_rows(language):
  """Conditional synthetic data is the translation task: record i is [sentence i of the unconditional source ;
  its translation], tokenized by a word tokenizer that covers both languages, in [condition ; target] rows."""
  translation = synthetic.SyntheticTranslation(language.vocabulary)
  tok = tokenizer_lib.load_tokenizer("synthetic", translation)
  assert len(tok) == 3 + 2 * len(language.vocabulary)
  c = data_config(conditional=True, max_length=24, max_condition_length=12)
  c.flow.pad_token = "eos"
  plain = sources.make_source(data_config().data, "train", language)
  records = sources.make_source(c.data, "train", language)
  assert [r["input"] for r in records] == [r["text"] for r in plain]
  assert all(r["output"] == translation.translate(r["input"]) for r in records)
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  for row, record in enumerate(records[i] for i in range(len(b["ids"]))):
    source, target = encode(tok, record["input"]), encode(tok, record["output"])
    assert tok.unk_token_id not in source + target and len(source) == len(target) <= 12
    n = len(source) + len(target)
    assert b["ids"][row].tolist() == source + target + [tok.eos_token_id] * (24 - n)
    assert tok.decode(b["ids"][row][len(source):n]) == record["output"]
    assert b["cond_mask"][row].tolist() == [True] * len(source) + [False] * (24 - len(source))
    assert b["valid"][row].tolist() == [True] * n + [False] * (24 - n)
    assert (b["loss_mask"][row] == ~b["cond_mask"][row]).all()  # EOS padding: every target position is learned


def test_conditional_length_errors(tmp_path, tok):
  c, _ = _conditional_config(tmp_path, "pad")
  c.data.max_condition_length = 8
  with pytest.raises(ValueError, match="max_condition_length"):
    pipeline.make_dataset(c, tok, "train")
  c.data.max_condition_length, c.data.packing = 4, True
  with pytest.raises(ValueError, match="packing"):
    pipeline.make_dataset(c, tok, "train")


@pytest.mark.parametrize("pad_token", ["pad", "eos"])
def test_pretokenized_ids_are_used_as_they_are(tmp_path, tok, pad_token):
  """The reference's pre-tokenized columns through the whole pipeline: no EOS added, none forced at the cut."""
  save_hf_dataset(tmp_path / "ids", {"input_ids": [[5, 6, 1], [7], [8, 9], [10, 11, 12, 13, 1]],
                                      "condition_input_ids": [[20, 21, 22, 23], [24], [25, 26], [27]]})
  c = data_config(source="hf_arrow", path=str(tmp_path / "ids"), max_length=4, text_key="input_ids")
  c.flow.pad_token = pad_token
  p = 1 if pad_token == "eos" else 0
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  assert b["ids"].tolist() == [[5, 6, 1, p], [7, p, p, p], [8, 9, p, p], [10, 11, 12, 13]]
  assert b["valid"].sum(1).tolist() == [3, 1, 2, 4]
  c.data.update(conditional=True, max_length=6, max_condition_length=3, input_key="condition_input_ids",
                output_key="input_ids")
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  assert b["ids"].tolist() == [[20, 21, 22, 5, 6, 1], [24, 7, p, p, p, p], [25, 26, 8, 9, p, p],
                               [27, 10, 11, 12, 13, 1]]
  assert b["cond_mask"].sum(1).tolist() == [3, 1, 2, 1] and b["valid"].sum(1).tolist() == [6, 2, 4, 6]


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_round_trip(language, tok, packing):
  c = data_config(shuffle=True, packing=packing)
  dataset = pipeline.make_dataset(c, tok, "train", language=language, seed=3)
  it = iter(dataset)
  first = _take(it, 2)
  state = it.get_state()
  rest = _take(it, 3)
  restored = iter(pipeline.make_dataset(c, tok, "train", language=language, seed=3))
  restored.set_state(state)
  for a, b in zip(rest, _take(restored, 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["ids"], rest[0]["ids"])


def test_shuffle_seed_and_epochs(tmp_path):
  words = [f"w{i}" for i in range(24)]
  tok = tokenizer_lib.build_word_tokenizer(words)
  (tmp_path / "lines.txt").write_text("\n".join(words))
  c = data_config(source="text", path=str(tmp_path / "lines.txt"), shuffle=True)

  def order(seed, epochs):
    batches = list(pipeline.make_dataset(c, tok, "train", seed=seed, num_epochs=epochs))
    return [int(i) - 3 for b in batches for i in b["ids"][:, 0]]

  once = order(0, 1)
  assert sorted(once) == list(range(24)) and once != list(range(24))
  assert order(0, 1) == once and order(1, 1) != once
  twice = order(0, 2)
  assert twice[:24] == once and sorted(twice[24:]) == list(range(24)) and twice[24:] != once


def test_process_shards_are_disjoint(tmp_path):
  words = [f"w{i}" for i in range(24)]
  tok = tokenizer_lib.build_word_tokenizer(words)
  (tmp_path / "lines.txt").write_text("\n".join(words))
  c = data_config(source="text", path=str(tmp_path / "lines.txt"), shuffle=True)
  c.optim.global_batch_size = 6
  seen = []
  for p in range(3):
    batches = list(pipeline.make_dataset(c, tok, "train", process_index=p, process_count=3, num_epochs=1))
    assert len(batches) == 4 and all(b["ids"].shape == (2, S) for b in batches)
    seen.append({int(i) - 3 for b in batches for i in b["ids"][:, 0]})
  assert all(len(s) == 8 for s in seen) and set.union(*seen) == set(range(24))
  c.optim.global_batch_size = 4
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(c, tok, "train", process_index=0, process_count=3)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(language, tok):
  absl_flags = pytest.importorskip("absl.flags")
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()
  c = data_config(shuffle=True)
  expected = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 3)
  c.data.num_workers = 2
  got = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 3)
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
