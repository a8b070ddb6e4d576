"""One process of a multi-process GPT-2 scoring job (tests/integration/test_multiprocess.py):

  python -m tests.gpt2_scoring_worker GPT2_DIR MAX_LENGTH TEXTS_JSON

Starts jax.distributed from the ELF_* variables, scores the texts with the batch split over a data x fsdp mesh of
every process's devices and prints `scores: {...}` (every process gets the figures).
"""
import json
import sys

from elf_jax.parallel import mesh as mesh_lib


def main(directory: str, max_length: str, texts: str):
  mesh_lib.initialize_distributed()
  from elf_jax.eval import gen_ppl  # pylint: disable=import-outside-toplevel  (after jax.distributed)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
  scorer = gen_ppl.GenPPLScorer.from_pretrained(directory, batch_size=8, mesh=mesh, max_length=int(max_length))
  print("scores: " + json.dumps(scorer.score(json.loads(texts))), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
