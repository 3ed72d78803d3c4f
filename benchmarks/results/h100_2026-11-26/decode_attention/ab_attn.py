"""ab_decode with the decode attention chosen per variant: ATTN=old (8a9124b's kernel, attn_old.py) or new."""
import os, sys
sys.path.insert(0, "/tmp")
import attn_old
from cqil_kernels import fused
from cqil_kernels.ops import attention as new

def dispatch(*a, **k):
    return (attn_old if os.environ.get("ATTN", "new") == "old" else new).group_attention(*a, **k)

fused.group_attention = dispatch
sys.path.insert(0, os.path.join(os.environ["R"], "benchmarks"))
import ab_decode
ab_decode.main()
