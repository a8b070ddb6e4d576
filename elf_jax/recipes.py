"""The shipped training recipes: each `configs/<name>.py` is a `get_config()` that calls one of these.

`owt(size)` is the reference's OpenWebText recipe at ELF-B / M / L (its train_owt_ELF-{B,M,L}.yml), `xsum()` and
`wmt_de_en()` its conditional ELF-B recipes, `tiny()` / `tiny_distill()` / `tiny_cond()` the offline demos. They
live in the package (not in configs/) so that configs sharing a recipe import it like any module;
`tests/test_recipes.py` compares the official ones field by field with the reference's YAMLs. Every field is
documented in `elf_jax/config.py`.
"""
import ml_collections

from elf_jax.config import base_config

# The authors' frozen encoder by hub path (elf_jax.weights.encoder.KNOWN_ENCODERS knows its architecture).
OFFICIAL_ENCODER = "embedded-language-flows/t5_small_encoder_jax/t5_small_encoder_jax.pkl"

# Network sizes (docs/method.md#network): depth, hidden, heads. ELF-B 104.58M, ELF-M 342.54M, ELF-L 652.10M parameters.
OWT_SIZES = {"b": (12, 768, 12), "m": (24, 1056, 16), "l": (32, 1280, 16)}
OWT_EPOCHS = {"b": 5.0, "m": 4.0, "l": 3.0}


def owt(size: str) -> ml_collections.ConfigDict:
  """ELF-`size` ("b" | "m" | "l") on OpenWebText, the reference recipe (docs/method.md#network, #training-recipe,
  #sampling). `base_config()` holds its settings already (the T5-small encoder, the objective, Muon at lr = 1e-3 * 512 /
  256 after a 0.5-epoch warm-up, the owt_sde32 sampling preset, 1000 evaluation samples); this sets the rest."""
  if size not in OWT_SIZES:
    raise ValueError(f"owt recipe: unknown size {size!r}; expected one of {sorted(OWT_SIZES)}")
  c = base_config()
  c.seed = 42
  c.model.depth, c.model.hidden_size, c.model.num_heads = OWT_SIZES[size]
  # The frozen T5-small encoder as the official YAMLs name it: the authors' pickle by hub path (C = 512; Hugging
  # Face's t5-small is the same network: --config.encoder.name_or_path=t5-small).
  c.encoder.name_or_path = OFFICIAL_ENCODER
  c.flow.label_drop_prob = 0.0  # unconditional: nothing to drop (the reference's default)
  # Data: the reference's T5-tokenized OpenWebText (one dataset; no evaluation split), 1024 tokens per row.
  c.data.source = "hf_arrow"
  c.data.path = "embedded-language-flows/openwebtext-t5"
  c.data.text_key = "input_ids"
  c.optim.num_epochs = OWT_EPOCHS[size]  # of len(train) // 512 steps
  c.sample.batch_size = 125
  c.checkpoint.every_steps = 2000
  c.logging.log_every_steps = 100
  return c


def xsum() -> ml_collections.ConfigDict:
  """ELF-B on XSum summarisation (conditional: [document ; summary]), the reference's train_xsum_ELF-B.yml: the
  OpenWebText ELF-B recipe with the conditional objective, 1088 tokens (1024 for the condition) and 100 epochs."""
  c = owt("b")
  c.data.path = "embedded-language-flows/xsum_{split}_t5"  # xsum_train_t5, xsum_validation_t5
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
  c.eval.mbr_metric = "rougeL"  # MBR (eval.mbr_candidates > 1) selects by ROUGE-L, the summarisation figure
  return c


def wmt_de_en() -> ml_collections.ConfigDict:
  """ELF-B on WMT14 German→English ([German ; English]), the reference's train_de-en_ELF-B.yml: the XSum recipe at
  128 tokens (64 for the condition) with 5000 evaluation samples."""
  c = xsum()
  c.data.path = "embedded-language-flows/wmt14_de-en_{split}_t5"  # wmt14_de-en_train_t5, wmt14_de-en_validation_t5
  c.data.max_length = 128  # condition + target
  c.data.max_condition_length = 64
  c.sample.num_samples = 5000
  c.eval.mbr_metric = "bleu"  # MBR (eval.mbr_candidates > 1) selects by sentence BLEU, the translation figure
  return c


def tiny() -> ml_collections.ConfigDict:
  """The offline embedded default: a 0.9M-parameter ELF on the synthetic language with one word per class, a random
  T5-architecture encoder and AdamW for 3400 steps, with two opt-in objective variants that pay at this scale
  (configs/tiny.py describes it; README: the ablation)."""
  c = base_config()
  # Network: 4 blocks of width 128 (about 0.9M parameters), one time / guidance / mode token each (the reference's
  # four each would make the sequences 25 tokens long instead of 16, and every step that much slower).
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.bottleneck_dim = 32
  c.model.num_time_tokens = 1
  c.model.num_guidance_tokens = 1
  c.model.num_mode_tokens = 1
  c.model.vocab_size = 58  # the word tokenizer: 55 words + pad, EOS, unk
  c.model.block_loop = "unrolled"  # a CPU default: no stacking copies, faster steps (docs/model.md#block-loop)
  # Frozen encoder: a random 1-layer T5 of width 64 (C = 64), latents normalised by measured statistics. 64 channels
  # instead of 32, with the noise scaled by sqrt(64 / 32) below: 2.4% / 1.10 / 0.92 (ungrammatical, Gen. PPL and entropy
  # ratios) instead of 3.4% / 1.19 / 0.88 (README: the embedded default, third table).
  c.encoder.name_or_path = "random"
  c.encoder.dim = 64
  c.encoder.random_num_layers = 1
  c.encoder.random_d_ff = 128
  c.encoder.measure_latent_stats = True
  # Objective.
  # sigma ~ sqrt(C / 32): the distance between two words' latents grows with sqrt(C), so the noise does too, and each
  # time t keeps the signal-to-noise ratio it had at C = 32 (sigma 1 or 2 with C = 64 lose grammar: README).
  c.flow.denoiser_noise_scale = 1.41
  c.flow.P_mean, c.flow.P_std = -0.8, 1.0
  c.flow.decoder_prob = 0.1  # the decoder is learnt fast here (token loss < 0.03 by the end); denoising needs the steps
  c.flow.decoder_noise_scale = 1.0
  # Sentences are short (mean 6 words in 13 positions): pad with EOS and learn it, as the conditional tasks do, so that
  # the model knows what follows a sentence (with "pad", padded positions are never seen and sampling fills them).
  c.flow.pad_token = "eos"
  # Opt-in variants (not the reference's objective; README "The embedded default" measures each): the encoder attends
  # to the EOS padding, so every latent knows where the sentence ends (11.6% -> 4.8% ungrammatical samples), and an
  # exact half of each batch is self-conditioned, so the x_sc = 0 pass runs on that half only (15% faster steps).
  c.flow.encode_padding = True
  c.flow.self_cond_draw = "fixed_count"
  # Data: the synthetic language with one word per class, 13 tokens per row: every sentence of up to 12 words + EOS
  # fits (99.85% of them; 16 tokens would fit all, for a fifth more time per step: README, the embedded default).
  c.data.tokenizer = "synthetic"
  c.data.synthetic_words_per_class = 1
  c.data.max_length = 13
  # Optimisation: AdamW for a short run.
  c.optim.optimizer = "adamw"
  c.optim.base_lr = 6e-3  # lr = 6e-3 * 128 / 256 = 3e-3
  c.optim.global_batch_size = 128
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.num_steps = 3400  # under ten minutes end to end on 2 quiet cores (README: the measured time)
  c.optim.ema_decay = 0.998  # a ~500-step average: 0.999 lags a run this short (entropy ratio 0.88 instead of 0.91)
  # Sampling + evaluation at the end: the paper's headline OpenWebText setting (base_config's owt_sde32 preset).
  c.sample.num_samples = 500
  c.sample.batch_size = 250
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2
  return c


def tiny_distill() -> ml_collections.ConfigDict:
  """Progressive distillation of `tiny()` (teacher: the workdir runs/tiny): the official curriculum (student 16 → 1
  steps, teacher 4 → 64 sub-steps per student step) with rounds of 100 steps and the few-step sampling preset."""
  c = tiny()
  c.distill.teacher = "runs/tiny"
  c.distill.steps_per_round = 100
  c.distill.warmup_steps = 10
  c.optim.global_batch_size = 64
  c.optim.base_lr = 4e-3  # lr = 4e-3 * 64 / 256 = 1e-3, constant after the warm-up (the authors' recipe shape)
  c.optim.schedule = "constant"
  c.optim.ema_decay = 0.98  # a ~50-step average of a 100-step round
  c.sample.preset = "fewstep"
  c.eval.sweep = "steps=1,2,4,8,16,32"  # --mode=eval: Gen. PPL and entropy against steps (DIR/steps.png)
  c.checkpoint.every_steps = 50
  c.logging.log_every_steps = 10
  return c


def tiny_cond() -> ml_collections.ConfigDict:
  """The offline conditional demo: `tiny()`'s network and encoder on the synthetic translation task ([source ;
  target], elf_jax/data/synthetic.py `SyntheticTranslation`), trained with label dropping and sampled with
  classifier-free guidance, scored by BLEU (configs/tiny_cond.py describes it)."""
  c = tiny()
  c.model.vocab_size = 113  # the word tokenizer of the task: 55 source + 55 target words + pad, EOS, unk
  # The reference's objective, not tiny()'s opt-in variants: the README's BLEU table and examples/tiny_cond were
  # measured so.
  c.flow.encode_padding = False
  c.flow.self_cond_draw = "bernoulli"
  # Latents of 32 channels and noise scale 1, not tiny()'s 64 and 1.41: the shipped examples/tiny_cond was trained so.
  c.encoder.dim = 32
  c.flow.denoiser_noise_scale = 1.0
  # Data: [source ; target] rows of 24 tokens, the source cut to 12 words (99.9% of sentences are no longer).
  c.data.conditional = True
  c.data.max_length = 24
  c.data.max_condition_length = 12
  # Objective: the conditional recipes' label dropping (classifier-free guidance training).
  c.flow.label_drop_prob = 0.1
  # Optimisation: tiny's AdamW and cosine schedule, for fewer steps (the rows are 1.5x longer: 0.7 CPU-s per step).
  c.optim.num_steps = 1200
  # Sampling: the conditional preset (ODE, classifier-free guidance s = 2, w = 1) at 32 steps, on 500 conditions.
  c.sample.preset = "cond_ode64"
  c.sample.steps = 32
  c.sample.num_samples = 500
  c.sample.batch_size = 250
  return c


# The published checkpoints (hub repositories of the authors) → the recipe of their task: what the weights do not
# say (conditional or not, max_length, condition length, sampling preset). `...-torch` are the same weights in the
# authors' PyTorch format.
OFFICIAL_CHECKPOINTS = {
    "ELF-B-owt": lambda: owt("b"), "ELF-M-owt": lambda: owt("m"), "ELF-L-owt": lambda: owt("l"),
    "ELF-B-xsum": xsum, "ELF-B-de-en": wmt_de_en,
}


def official_recipe(repo_name: str) -> ml_collections.ConfigDict | None:
  """The recipe of a published checkpoint named by its repository (`embedded-language-flows/ELF-B-owt`, its
  `-torch` twin, or a path inside either), or None if it is not one."""
  parts = repo_name.strip("/").split("/")
  name = parts[1] if len(parts) >= 2 and parts[0] == "embedded-language-flows" else ""
  recipe = OFFICIAL_CHECKPOINTS.get(name.removesuffix("-torch"))
  return recipe() if recipe else None
