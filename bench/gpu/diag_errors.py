"""Diagnoses how a failing op check surfaces: each case runs in a subprocess and must raise a
RuntimeError in Python (a crash would show as a negative return code)."""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "aten error": "torch.mm(torch.rand(2, 3), torch.rand(2, 3))",
    "linkage_tree rank-2": "torch.ops.evomask.linkage_tree(torch.rand(4, 4))",
    "hier_mask ratio": "torch.ops.evomask.hier_mask(torch.rand(1, 4, 4), torch.rand(1, 4), 2.0, 0.5)",
    "gmm_em bad K": "torch.ops.evomask.gmm_em(torch.rand(1, 4, 4), torch.rand(1, 0, 4), 2, 1e-6)",
}

if __name__ == "__main__":
    worst = 0
    for name, call in CASES.items():
        code = f"import torch, evomask_ext\ntry:\n    {call}\nexcept RuntimeError as e:\n    print('RuntimeError:', str(e).splitlines()[0])\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(f"{name:<22} rc={proc.returncode} {proc.stdout.strip()[:100]} {proc.stderr.strip()[-300:] if proc.returncode else ''}")
        worst = min(worst, proc.returncode)
    sys.exit(1 if worst else 0)
