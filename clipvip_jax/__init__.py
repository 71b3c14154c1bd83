"""clipvip_jax: CLIP-ViP and CLIP2Video in JAX/Flax NNX."""
