"""The embedded demo model: a small text-to-image latent diffusion model of national flags.

`flags` renders the training data, `vocab` builds the CLIP tokenizer, `architecture` holds the
model configs, `train` is the (seeded, resumable) training script and `quality` the check.
"""
