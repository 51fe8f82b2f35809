"""The unlearning fine-tune in parts, one concern each (docs/ARCHITECTURE.md):

- `draws`: the random draws every process shares (batches, noise levels, noise);
- `losses`: stateless loss functions of ours, weights passed in;
- `baselines`: the NegGrad, SISS and EraseDiff losses;
- `methods`: how each method gets and combines its two gradients (ours projects);
- `control`: the stop rule, a callback with its own state;
- `unlearn_core.trainer`: the loop and its checkpoints.
"""
