"""Data: datasets and their readers, the VAE and the latent space a latent run trains in.

    datasets    DataConfig and the datasets (Fashion-MNIST, ImageNet-layout folders, downsampled-ImageNet npz)
    image_io    reading images and npz archives
    cache       what the on-disk caches of a dataset share: its tag, fingerprint, clean images
    clutter     fmnist-clutter: Fashion-MNIST items at a random place and scale over clutter (issue #32)
    vae         the VAE (diffusers' AutoencoderKL, or the embedded Fashion-MNIST autoencoder)
    latents     the latent cache: a dataset encoded once by a VAE, memory-mapped
    latent_run  what a latent run needs: its VAE, its caches, the one decode to image space

Imports the flow and the base modules.
"""
