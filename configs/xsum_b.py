r"""ELF-B on XSum summarisation (conditional: [document ; summary]) — the reference's train_xsum_ELF-B.yml.

  python -m elf_jax.main --config=configs/xsum_b.py --workdir=gs://BUCKET/elf_xsum
  python -m elf_jax.main --config=configs/xsum_b.py --workdir=DIR --mode=eval   # ROUGE-1/2/L

The data is the reference's pre-tokenized XSum (T5 ids: `condition_input_ids` = document, `input_ids` = summary,
used as they are), one Hugging Face hub dataset per split ("{split}" in the path), fetched into the hub cache on
first use; without hub access, copy them and pass --config.data.path=DIR/xsum_{split}_t5.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import owt_b  # noqa: E402


def get_config():
  c = owt_b.get_config("b")
  c.data.path = "embedded-language-flows/xsum_{split}_t5"  # xsum_train_t5, xsum_validation_t5
  c.data.split, c.data.eval_split = "train", "validation"
  c.data.conditional = True
  c.data.input_key, c.data.output_key = "condition_input_ids", "input_ids"
  c.data.max_length = 1088  # condition + target
  c.data.max_condition_length = 1024  # the reference's max_input_length
  # Conditional tasks pad with EOS and learn it (EOS padding is in the loss, not seen by the encoder); the decoder
  # branch uses less noise; label dropping trains classifier-free guidance.
  c.flow.pad_token = "eos"
  c.flow.decoder_noise_scale = 1.0
  c.flow.label_drop_prob = 0.1
  c.optim.num_epochs = 100.0
  c.optim.warmup_steps = 5000
  # Sampling: ODE 64 steps, classifier-free guidance s = 2, w = 1; 100 evaluation samples.
  c.sample.preset = "cond_ode64"
  c.sample.num_samples = 100
  c.sample.batch_size = 64
  return c
