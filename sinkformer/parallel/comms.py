"""What a compiled step communicates, read from its HLO after SPMD partitioning.

Every collective (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute)
is counted as many times as it runs in one step: the trip counts XLA annotates on the
loops around it (scanned layers, gradient accumulation) are multiplied along the call
graph from the entry computation. Bytes are per device: an all-gather's result (what each
device ends up holding), a reduce-scatter's or all-reduce's operand (what each device puts
in), so two layouts of one model compare like for like.

The module read is the partitioner's output (`partitioned`, dumped during compilation):
the partitioner decides what is communicated, in which dtype and how often, the same way
for every platform, while a CPU's later passes widen bfloat16 arithmetic and collectives to
float32 and GPU and TPU compilers may still combine or reorder them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_LOOP = re.compile(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
                    r"|branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str
  dtype: str
  bytes: int      # per device, per execution (a reduce-scatter's: its operand)
  runs: int       # executions per step
  name: str       # the jax operation it comes from (its last name scopes)

  @property
  def total(self) -> int:
    return self.bytes * self.runs


def _arrays(shape: str) -> list[tuple[str, int]]:
  return [(d, math.prod(int(x) for x in dims.split(",") if x) * DTYPE_BYTES.get(d, 4))
          for d, dims in _ARRAY.findall(shape)]


def _group_size(line: str) -> int:
  """How many devices take part: replica_groups={{0,1,..}}, [n,m]<=[k], or mesh[...] {axes}."""
  m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if m:
    sizes = {k.strip(" '"): int(v) for k, v in (p.split("=") for p in m.group(1).split(","))}
    return math.prod(sizes[a.strip(" '")] for a in m.group(2).split(","))
  return 0   # not stated (e.g. collective-permute's pairs): counted


def _trips(line: str, condition: list[str]) -> int:
  """A while loop's trip count: XLA's annotation, else the bound of the `i < N` condition
  that lax.scan and fori_loop lower to (counting from 0)."""
  known = _TRIPS.search(line)
  if known:
    return int(known.group(1))
  text = "\n".join(condition)
  bound = re.search(r"s32\[\] constant\((\d+)\)", text)
  return int(bound.group(1)) if bound and "direction=LT" in text else 1


def read(hlo: str) -> list[Collective]:
  """Every collective of an optimized HLO module, with how often it runs per step."""
  bodies: dict[str, list[str]] = {}
  entry = current = None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      bodies[current] = []
      entry = current if m.group(1) else entry
    elif current is not None:
      bodies[current].append(line)
  if entry is None:
    raise ValueError("not an HLO module: no ENTRY computation")
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int):
    runs[name] += times
    for line in bodies.get(name, ()):
      loop = _LOOP.search(line)
      if loop:
        visit(loop.group(2), times * _trips(line, bodies.get(loop.group(1), ())))
      for single, branches in _CALLS.findall(line):
        for callee in [single] if single else re.findall(r"%?([\w.\-]+)", branches):
          visit(callee, times)

  visit(entry, 1)
  out = []
  for name, lines in bodies.items():
    for line in lines if runs.get(name) else ():
      m = _INSTRUCTION.match(line)
      op = m and m.group(2).removesuffix("-start")
      if op not in OPS:
        continue
      group = _group_size(line)
      if group == 1:   # a group of one device moves nothing
        continue
      arrays = _arrays(m.group(1))
      if m.group(2).endswith("-start"):   # async: (operands, results)
        arrays = arrays[len(arrays) // 2:] if op == "all-gather" else arrays[:len(arrays) // 2]
      by_dtype = collections.Counter()
      for dtype, size in arrays:   # a combined collective moves several arrays
        by_dtype[dtype] += size * (group if op == "reduce-scatter" else 1)
      where = re.search(r'op_name="([^"]*)"', line)
      for dtype, size in by_dtype.items():
        out.append(Collective(op, dtype, size, runs[name],
                              "/".join(where.group(1).split("/")[-3:]) if where else ""))
  return out


def summary(collectives: list[Collective]) -> dict:
  """{op: {"runs", "bytes", "by_dtype": {dtype: bytes}}} per device per step."""
  out = {}
  for c in collectives:
    row = out.setdefault(c.op, {"runs": 0, "bytes": 0, "by_dtype": {}})
    row["runs"] += c.runs
    row["bytes"] += c.total
    row["by_dtype"][c.dtype] = row["by_dtype"].get(c.dtype, 0) + c.total
  return out


def partitioned(lowered):
  """(compiled, its HLO module as the SPMD partitioner left it) of `lowered` (jax Lowered)."""
  import glob
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    compiled = lowered.compile(compiler_options={"xla_dump_to": tmp,
                                                 "xla_dump_hlo_pass_re": "spmd-partitioning"})
    dumps = sorted(glob.glob(f"{tmp}/*after_spmd-partitioning*.txt"))
    if not dumps:   # one device: nothing to partition
      return compiled, compiled.as_text()
    with open(dumps[-1]) as f:
      return compiled, f.read()
