"""Pure-PyTorch twins of the Triton kernels in `cqil_kernels.ops` (same names with a `_ref` suffix).

They define what each kernel computes, are what the kernel tests compare against (besides a float64
evaluation of the same function), and run anywhere. They compute in fp32 and round once on output, as
the kernels do.
"""
