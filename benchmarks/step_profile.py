"""Where a compiled step's time goes: per-HLO-instruction times from a `jax.profiler` trace, grouped by kind of
instruction and by the source that emitted it (used by `train_step.py --profile`).

On the CPU backend XLA records one trace event per executed thunk (top-level instruction of the entry, a while body
or a conditional branch) when `--xla_cpu_enable_xprof_traceme=true` is in XLA_FLAGS. Times are summed per
instruction, so instructions that run concurrently on different threads add up (a share of the total, not of the
wall time). Container instructions (while, conditional, call) are left out: their children are counted.
"""
import collections
import glob
import gzip
import json
import os
import re

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
CONTAINERS = ("while", "conditional", "call")
# Source buckets, first match wins, on the instruction's metadata op_name (the jax name stack) lower-cased.
SOURCES = (("encoder", ("t5", "encoder", "encode_text")), ("attention", ("attn",)), ("mlp", ("mlp",)),
           ("readout", ("unembed", "proj_kernel", "log_softmax", "_readout", "decoder_logits")),
           ("blocks (other)", ("blocks", "norm1", "norm2")),
           ("optimizer, clip, EMA", ("optax", "adam", "muon", "clip", "ema", "apply_updates", "apply_gradients")))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def enable_tracing():
  """Adds the CPU thunk-tracing flag to XLA_FLAGS; call before jax initialises its backend."""
  if TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG}".strip()


def parse_hlo(text: str) -> dict[str, dict]:
  """Optimised HLO text → {instruction name: {opcode, op_name, body}}; body = the opcodes of a fusion's computation."""
  computations, current, info = {}, None, {}
  for line in text.splitlines():
    start = _COMPUTATION.match(line)
    if start and "=" not in line.split("{")[0]:
      current = computations.setdefault(start.group(1), [])
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    if current is not None:
      current.append(opcode)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    info[name] = dict(opcode=opcode, op_name=op_name.group(1) if op_name else "",
                      calls=calls.group(1) if calls else None)
  for entry in info.values():
    entry["body"] = set(computations.get(entry.pop("calls"), ())) if entry["opcode"] == "fusion" else set()
  return info


def kind(entry: dict) -> str:
  """What an instruction does: matmul, dynamic-slice, dynamic-update-slice, copy/transpose, reduce, random, ..."""
  ops = entry["body"] | {entry["opcode"]}
  if ops & {"dot", "convolution"} or entry["opcode"] == "custom-call":
    return "matmul"
  if "dynamic-update-slice" in ops:
    return "dynamic-update-slice"
  if "dynamic-slice" in ops:
    return "dynamic-slice"
  if ops & {"rng-bit-generator", "rng"}:
    return "random"
  if ops <= {"copy", "transpose", "bitcast", "fusion", "parameter", "reshape", "broadcast"}:
    return "copy/transpose/broadcast"
  if ops & {"reduce", "reduce-window"}:
    return "reduce fusion"
  if entry["opcode"] in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute"):
    return "collective"
  return "elementwise fusion"


def source(entry: dict) -> str:
  name = entry["op_name"].lower()
  for bucket, needles in SOURCES:
    if any(n in name for n in needles):
      return bucket
  return "other"


def latest_trace(logdir: str) -> list[dict]:
  """The complete events of the newest perfetto trace under `logdir`."""
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"no perfetto trace under {logdir}: was jax.profiler.trace given create_perfetto_trace=True?")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def op_times(events: list[dict], hlo: dict[str, dict]) -> dict[str, float]:
  """{instruction name: summed milliseconds} of the traced instructions found in `hlo` (containers left out)."""
  times = collections.Counter()
  for e in events:
    name = (e.get("args") or {}).get("hlo_op")
    if name in hlo and hlo[name]["opcode"] not in CONTAINERS:
      times[name] += e["dur"] / 1e3
  return dict(times)


def breakdown(times: dict[str, float], hlo: dict[str, dict]) -> dict[str, dict[str, float]]:
  """{"kind": {kind: ms}, "source": {source: ms}} of `op_times`' output."""
  out = {"kind": collections.Counter(), "source": collections.Counter()}
  for name, ms in times.items():
    out["kind"][kind(hlo[name])] += ms
    out["source"][source(hlo[name])] += ms
  return {k: dict(v) for k, v in out.items()}


def print_table(title: str, columns: dict[str, dict[str, float]]):
  """Rows = the union of the columns' keys (sorted by the first column), ms per column, then the total."""
  rows = sorted({k for col in columns.values() for k in col}, key=lambda k: -next(iter(columns.values())).get(k, 0))
  names = list(columns)
  print(f"{title:28} " + " ".join(f"{n:>22}" for n in names))
  for row in rows + ["total"]:
    values = [sum(col.values()) if row == "total" else col.get(row, 0.0) for col in columns.values()]
    print(f"{row:28} " + " ".join(f"{v:20.1f}ms" for v in values))
