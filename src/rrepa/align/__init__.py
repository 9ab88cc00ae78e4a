"""Representation alignment: matching the flow's hidden states to a frozen encoder's features.

    head          AlignConfig, the projectors (per-token MLP, iREPA conv), the cosine loss, grid matching
    reverse       the flow's features along the forward, detached and reverse paths (naive, pseudo, jacobi-K)
    encoder_base  FrozenEncoder: what a target encoder provides (features, grid, fingerprint)
    encoders      target encoders by name: DINOv2 (timm) and the embedded fmnist-ssl
    features      the memory-mapped cache of encoder targets

Imports the flow, the data, the evaluation and the base modules (never the training loop).
"""
