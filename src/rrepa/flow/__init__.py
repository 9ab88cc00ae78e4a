"""The flow: TARFlow and everything that runs it without training it.

    config      FlowConfig (the shape of the flow) and FlowOutput (what a forward pass returns)
    blocks      one autoregressive block: causal transformer with a KV cache, forward, sequential and Jacobi reverse
    tarflow     TARFlow: the stack of blocks, likelihood, guidance, sampling, denoising
    jacobi      the Jacobi sampler's options and statistics
    sample      sampling many images (sharded, seeded per batch) and PNG grids
    checkpoint  the flow's files: training checkpoints (ckpt-*.pt) and safetensors weights
    convert     apple/ml-tarflow checkpoints into rrepa's format
    testing     what tests and benchmarks share: models far from the identity, a fake Fashion-MNIST

Imports only the base modules (rrepa.utils, rrepa.precision, rrepa.distributed).
"""
