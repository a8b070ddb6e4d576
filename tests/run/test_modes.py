"""The modes of the command line: the few-step preset and `--mode=eval`'s steps sweep."""
import types

from elf_jax import report
from elf_jax.config import load_config_file
from elf_jax.run import generate, modes
from elf_jax.sampling import sampler
from elf_jax.sampling.files import Samples

from tests.conftest import REPO


def test_few_step_settings_and_the_steps_sweep(tmp_path, monkeypatch):
  """The authors' few-step table by step count; `--mode=eval`'s sweep under the fewstep preset samples every step
  count with its own settings and plots Gen. PPL and entropy against steps."""
  config = load_config_file(REPO / "configs" / "tiny_distill.py", {})
  for steps, gamma, w in [(1, 1.5, 2.5), (8, 1.5, 2.5), (16, 2.0, 2.0), (32, 2.0, 2.0)]:
    s = sampler.SampleConfig.from_config(config, steps=steps, eos_id=1, pad_id=0)
    assert (s.method, s.steps, s.grid, s.gamma, s.guidance_scale) == ("sde", steps, "logit_normal", gamma, w)

  assert config.sample.preset == "fewstep" and config.eval.sweep == "steps=1,2,4,8,16,32"
  used = []
  monkeypatch.setattr(generate, "generate", lambda exp, params, num, seed, sample_config, conditions, candidates: (
      used.append(sample_config) or generate.Generation(Samples(texts=[]))))
  monkeypatch.setattr(generate, "score", lambda exp, samples: {
      "gen_ppl": 10.0 / used[-1].steps, "entropy": 1.0, "true_gen_ppl": 3.0, "true_entropy": 1.5})
  exp = types.SimpleNamespace(config=config, sample_config=lambda **overrides: sampler.SampleConfig.from_config(
      config, eos_id=1, pad_id=0, **overrides))
  rows = modes.frontier(exp, None, str(tmp_path), report.MetricsWriter(str(tmp_path), tensorboard=False))
  assert [(c.steps, c.gamma, c.guidance_scale, c.method) for c in used] == [
      (1, 1.5, 2.5, "sde"), (2, 1.5, 2.5, "sde"), (4, 1.5, 2.5, "sde"), (8, 1.5, 2.5, "sde"), (16, 2.0, 2.0, "sde"),
      (32, 2.0, 2.0, "sde")]
  assert [r["gamma"] for r in rows] == [1.5] * 4 + [2.0] * 2
  png = (tmp_path / "steps.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 1000
