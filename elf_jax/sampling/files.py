"""Sample files: DIR/samples/<name>.jsonl (one {"text", "condition", "reference", "ids"} object per sample; the
last three when known) and DIR/samples/<name>.txt (the texts, one per line)."""
import dataclasses
import json

import jax

from elf_jax import fs


@dataclasses.dataclass(frozen=True)
class Samples:
  """Decoded samples. texts: N strings; ids: N token-id lists (None when read from text); conditions: the decoded
  condition of each sample and references: the target text it is scored against (conditional tasks, else None)."""
  texts: list[str]
  ids: list[list[int]] | None = None
  conditions: list[str] | None = None
  references: list[str] | None = None


_FIELDS = (("text", "texts"), ("condition", "conditions"), ("reference", "references"), ("ids", "ids"))


def write_samples(workdir: str, name: str, samples: Samples) -> str:
  """Writes DIR/samples/<name>.jsonl and <name>.txt on process 0 (every process holds the same samples); returns
  the .jsonl path."""
  out_dir = fs.path(workdir) / "samples"
  path = out_dir / f"{name}.jsonl"
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [(key, getattr(samples, attr)) for key, attr in _FIELDS if getattr(samples, attr) is not None]
    path.write_text("".join(json.dumps({key: values[i] for key, values in columns}) + "\n"
                            for i in range(len(samples.texts))))
    (out_dir / f"{name}.txt").write_text("\n".join(samples.texts) + "\n", encoding="utf-8")
  return str(path)


def read_samples(path: str) -> Samples:
  """Reads a samples JSONL written by `write_samples` (or any JSONL with a "text" field per line)."""
  if not fs.path(path).exists():
    raise FileNotFoundError(f"samples file {path!r} (config.eval.samples_path) does not exist")
  rows = [json.loads(line) for line in fs.path(path).read_text().split("\n") if line.strip()]
  if not rows or "text" not in rows[0]:
    raise ValueError(f"{path!r} holds no JSON lines with a 'text' field")
  return Samples(**{attr: [r[key] for r in rows] for key, attr in _FIELDS if key in rows[0]})
