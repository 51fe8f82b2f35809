"""Hotfix Studio's core: prompt-free instance unlearning for diffusers models.

Computes only — model loading, generation with provenance, surrogates, the unlearning trainer,
adapters, metrics, attention capture and the job store. Never imports gradio.
"""

__version__ = "0.1.0"
