# EXPERIMENT: parallel_e2e with the one-shot limit at 1 MB (so 2 MB / 4 MB prefill chunks go through NCCL,
# which occupies fewer SMs beside the next chunk's GEMM). Run: torchrun ... .base/p6_nccl.py <parallel_e2e args>
import runpy, sys
import cqil_kernels.parallel.comm as comm
comm.default_one_shot_bytes = lambda world: 1 << 20
sys.argv = ["benchmarks/parallel_e2e.py"] + sys.argv[1:]
runpy.run_path("benchmarks/parallel_e2e.py", run_name="__main__")
