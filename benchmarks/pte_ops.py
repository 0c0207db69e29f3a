"""What an ExecuTorch program runs per call of `forward`: its instructions by kernel, delegate calls
counted as one each (docs/benchmarks.md, issue 9).

    python benchmarks/pte_ops.py PROGRAM.pte [...]
"""

import collections, sys
from pathlib import Path
from executorch.exir._serialize._program import deserialize_pte_binary

for path in sys.argv[1:]:
    prog = deserialize_pte_binary(Path(path).read_bytes())
    prog = getattr(prog, "program", prog)
    plan = next(p for p in prog.execution_plan if p.name == "forward")
    ops = [o.name + ("." + o.overload if o.overload else "") for o in plan.operators]
    c = collections.Counter()
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            t = type(a).__name__
            c[ops[a.op_index] if t == "KernelCall" else t] += 1
    print(path, sum(c.values()), "instructions;", c.most_common(14))
