"""`rrepa rehearse`: an ImageNet preset end to end at full size, with random weights on synthetic data.

    rehearse  the rehearsal: stages in order, the report
    stages    each stage: latents encode, feature cache, training steps, resume, sampling, evaluation
    assets    the synthetic dataset and the random-weight networks (DINOv2, SD-VAE, Inception) it uses
    measure   time, peak memory, FLOPs and bytes of a stage
    capacity  the capacity plan for N GPUs from the measurements

Imports training and everything below it.
"""
