"""Why telling the model "forget X" does not work: the instruction-forgetting probe.

For a concept X, a few prompt variants (baseline `a photo of X`, an explicit unlearning
instruction, a negation, a repeat-control, user-written ones) are compared on the same seeds of
one `DiffusionModel`:

- text side (`text`): cosine similarity of each variant's text embedding to the anchor
  `a photo of X`, and token ablation — the similarity drop when the concept tokens vs the
  instruction tokens (`tokens`) are removed;
- cross-attention (`run`): attention mass on the concept vs the instruction tokens per denoising
  step, its AUC over normalised steps, and per-token heat maps per step;
- image side: the images per variant (same initial noise per seed) and, when a CLIP model can be
  loaded, the CLIP image–text similarity of each image to the anchor.

`config` holds the settings (`ProbeConfig`) and the variants, `figures` the plots. The CLI verb is
`python -m unlearn_core probe`; the web app's tab is `ui.instruction_tab`.
"""

from unlearn_core.probe.config import (
    ANCHOR_TEMPLATE,
    CLIP_DEFAULT,
    CLIP_ENV,
    DEFAULT_VARIANTS,
    ProbeConfig,
    Variant,
    default_variants_text,
    parse_variants,
)
from unlearn_core.probe.figures import heatmap_image, heatmap_steps, plot_attention_mass, plot_heatmaps, plot_images, plot_similarity, token_choices
from unlearn_core.probe.run import CSV_COLUMNS, ProbeResult, VariantResult, auc, conclusion, export_zip, mass_on, probe_rows, run_probe, summary_lines, write_outputs
from unlearn_core.probe.text import ClipScorer, TextScores, encode_token_ids, load_clip, text_analysis, text_encoder_of
from unlearn_core.probe.tokens import TokenMap, TokenSets, map_words, padded, split_words, token_sets, without_positions

__all__ = [
    "ANCHOR_TEMPLATE",
    "CLIP_DEFAULT",
    "CLIP_ENV",
    "CSV_COLUMNS",
    "DEFAULT_VARIANTS",
    "ClipScorer",
    "ProbeConfig",
    "ProbeResult",
    "TextScores",
    "TokenMap",
    "TokenSets",
    "Variant",
    "VariantResult",
    "auc",
    "conclusion",
    "default_variants_text",
    "encode_token_ids",
    "export_zip",
    "heatmap_image",
    "heatmap_steps",
    "load_clip",
    "map_words",
    "mass_on",
    "padded",
    "parse_variants",
    "plot_attention_mass",
    "plot_heatmaps",
    "plot_images",
    "plot_similarity",
    "probe_rows",
    "run_probe",
    "split_words",
    "summary_lines",
    "text_analysis",
    "text_encoder_of",
    "token_choices",
    "token_sets",
    "without_positions",
    "write_outputs",
]
