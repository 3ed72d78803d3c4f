"""Same-process A/B of the KV cache's allocation in a 512-token prefill: new_cache + forward timed with
CUDA events (as cqil bench times prefill), one zeroed tensor for all layers (new) vs one per stage (old)."""
import json, os, statistics, sys
import torch
from cqil_kernels import CQILConfig
from cqil_kernels import model as M
from cqil_kernels.bench import DEFAULT_GROUPS, _events_ms, _warm_up_gpu, random_model
from cqil_kernels.demo import parse_groups

new_init = M.KVCache.__init__


def old_init(self, args, stages, batch, max_seq, device, dtype):
    shape = (batch, args.num_key_value_heads, max_seq, args.head_dim)
    self.stages = stages
    self.k = [torch.zeros((len(s), *shape), device=device, dtype=dtype) for s in stages]
    self.v = [torch.zeros((len(s), *shape), device=device, dtype=dtype) for s in stages]
    self.key_valid = torch.zeros(batch, max_seq, dtype=torch.bool, device=device)
    self.n_tokens = torch.zeros(batch, dtype=torch.int64, device=device)
    self.position = torch.zeros(1, dtype=torch.int32, device=device)
    self.start = torch.zeros(1, dtype=torch.int32, device=device)
    self.batch, self.max_seq, self.length = batch, max_seq, 0


shape = sys.argv[1]
dev = torch.device("cuda")
model = random_model(shape, torch.bfloat16, dev)
ids = torch.randint(0, model.args.vocab_size, (1, 512), device=dev)
_warm_up_gpu(dev, 2.0)
out = {}
for groups in ["none", DEFAULT_GROUPS[shape]]:
    model.cqil = CQILConfig() if groups == "none" else parse_groups(groups)
    runs = {"old": [], "new": [], "forward-only": []}
    cache = model.new_cache(1, 578)
    with torch.inference_mode():
        for r in range(4):
            for name in (["old", "new", "forward-only"] if r % 2 == 0 else ["forward-only", "new", "old"]):
                M.KVCache.__init__ = old_init if name == "old" else new_init
                if name == "forward-only":
                    def fn():
                        cache.length = 0  # the same preallocated cache each time (timing only)
                        cache.position.zero_(); cache.start.zero_(); cache.n_tokens.zero_(); cache.key_valid.zero_()
                        model(ids, cache=cache)
                else:
                    fn = lambda: model(ids, cache=model.new_cache(1, 578))
                runs[name].append(round(_events_ms(fn, 10), 3))
    M.KVCache.__init__ = new_init
    out[groups] = {k: dict(median_ms=statistics.median(v), runs=v) for k, v in runs.items()}
    print(shape, groups, {k: v["median_ms"] for k, v in out[groups].items()}, flush=True)
json.dump(dict(card=torch.cuda.get_device_name(), commit=os.environ.get("CQIL_COMMIT"), shape=shape, results=out),
          open(f"{os.environ.get('OUT', '/tmp')}/prefill_ab_{shape}.json", "w"), indent=1)
