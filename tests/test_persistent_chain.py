"""The persistent-chain prototype of benchmarks/persistent_chain.py (issue 26): the one-launch chain with
per-layer counters gives the same bits as a launch per layer, and both match a float64 chain."""

import pytest
import torch

from conftest import assert_kernel_close, import_benchmark, interpreter


@pytest.fixture(scope="module")
def chain_module():
    return import_benchmark("persistent_chain")


def assert_layers_close(chain) -> None:
    """Each layer's output against its PyTorch twin (fp32 accumulation) and float64, from the input the
    kernels stored for it (errors compounded over layers would say nothing about one layer)."""
    for layer in range(chain.layers):
        N, K = chain.layer_shape(layer)
        x, w = chain.act[layer, :chain.batch, :K], chain.weight(layer)
        twin = (x.float() @ w.float().t()).to(x.dtype)
        assert_kernel_close(chain.act[layer + 1, :chain.batch, :N].cpu(), twin.cpu(),
                            x.double().cpu() @ w.double().cpu().t(), terms=K)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers,batch,programs", [(1, 1, 2), (4, 3, 2), (3, 16, 5)])
def test_persistent_chain_matches_launches(chain_module, dtype, layers, batch, programs):
    """The one-launch chain (layer barrier, and dataflow with every tile taking the chunk-by-chunk loop)
    stores the launches' bits; the counters end at every layer's tiles and every chunk's producers."""
    chain = chain_module.Chain((64, 96), layers, batch, dtype, torch.device("cpu"), block_n=16, block_k=32,
                               programs_per_sm=programs, seed=layers)
    chain.run("launch")
    launched = chain.output().clone()
    tiles = [96 // 16 if layer % 2 == 0 else 64 // 16 for layer in range(layers)]
    chain.force_chunks = True
    for variant in ("persistent", "dataflow"):
        chain.act[1:].fill_(float("nan"))
        chain.run(variant)
        assert torch.equal(chain.output(), launched), variant
        assert chain.state[0].item() >= chain.programs  # every program took a ticket past the last tile
        assert chain.state[1:1 + layers].tolist() == tiles
        chunks = chain.state[1 + layers:].view(layers, 96 // 32)
        if variant == "dataflow":  # 32 / 16 producer tiles per chunk of the next layer's K
            assert chunks.tolist() == [[2] * (n // 2) + [0] * (3 - n // 2) for n in tiles]
        else:
            assert not chunks.any()
    assert_layers_close(chain)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_persistent_chain_cuda_variants_agree(chain_module):
    chain = chain_module.Chain((256, 768), 6, 5, torch.bfloat16, torch.device("cuda"), block_n=32, block_k=256)
    outs = {}
    for variant in chain_module.VARIANTS:
        if variant.startswith("pdl") and torch.cuda.get_device_capability() < (9, 0):
            continue
        chain.act[1:].fill_(float("nan"))
        chain.run(variant)
        outs[variant] = chain.output().clone()
    chain.force_chunks = True  # dataflow's chunked loop in every tile, its waits on the device
    chain.run("dataflow")
    outs["dataflow, chunked"] = chain.output().clone()
    for variant, out in outs.items():
        assert torch.equal(out, outs["launch"]), variant
    assert_layers_close(chain)


def test_chain_rejects_bad_shapes(chain_module):
    with pytest.raises(ValueError, match="multiple of block_n"):
        chain_module.Chain((64, 90), 2, 1, torch.float32, torch.device("cpu"), block_n=16, block_k=32)
    with pytest.raises(ValueError, match="batch must be"):
        chain_module.Chain((64, 96), 2, 17, torch.float32, torch.device("cpu"), block_n=16, block_k=32)
    with pytest.raises(ValueError, match="layers must be"):
        chain_module.Chain((64, 96), 0, 1, torch.float32, torch.device("cpu"), block_n=16, block_k=32)
