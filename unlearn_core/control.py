"""When training stops and how much the remember loss weighs: the control policy of `ours`, mixed
into `UnlearnTrainer` (as `baselines.BaselineLosses` is), whose state (`target_r`,
`remember_scale`, `consolidating_since`, ...) it reads and sets, and which checkpoints it.

- the targets' trajectories are re-recorded every `trajectory_refresh` steps, which gives r;
- training stops once r ≥ `stop_at_r`, or once the target is fixed at or past `steps`, and goes on
  past `steps` (up to `extend_until_fixed` more, the remember loss at `extend_remember_factor`)
  while it is not;
- while r climbs slowly, the target's nearest remember seeds are re-sampled (`neighbour_checks`):
  untouched, the remember weight is halved; leaving, it is doubled back; a target they found held
  trains to `steps_when_held`;
- once fixed, `consolidate_steps` more steps with a heavier remember loss, keeping the last weights
  that still fix the target.
"""

from __future__ import annotations

import torch

from unlearn_core.config import measures_r_while_training
from unlearn_core.sets import record_target_states

# How far below the r at which the target was fixed consolidation may let it fall. A correction's
# r falls under the heavier remember loss (chad, italy: 0.81 → 0.70 in 15 steps) while its other
# seeds were already kept; an edit against the concept (the crosses) holds its r and gets its
# other seeds back (docs/QUALITY.md). The first refresh below ends consolidation.
CONSOLIDATION_R_SLACK = 0.05
# `neighbour_checks`: the target climbs slowly when r gains less than NEIGHBOUR_CHECK_CLIMB over
# NEIGHBOUR_CHECK_EVERY steps; its nearest remember seeds then decide the remember weight's scale.
# A slow climb is the remember loss holding the target (netherlands-62: r 0.5–0.65 from step 25 to
# 90), which only costs something if the seeds it holds are near leaving: netherlands-62's nearest
# seeds kept SSIM ≥ 0.96 there, belgium-77's had fallen to 0.85 (docs/QUALITY.md).
NEIGHBOUR_CHECK_EVERY = 10
NEIGHBOUR_CHECK_CLIMB = 0.05
NEIGHBOURS_KEPT_SSIM = 0.95  # every checked seed at or above: the remember weight is halved
NEIGHBOURS_LOST_SSIM = 0.9  # one below: it is doubled back, up to the configured weight
MIN_REMEMBER_SCALE = 0.125


class ControlPolicy:
    def _unfixed_target_rows(self) -> torch.Tensor | None:
        """Rows of the target pool whose target is not yet fixed, when some targets are fixed and
        others not: a job with several targets spends its forget batch on the ones still short of
        `stop_at_r` (it stops only once all are fixed). A target that slips back is drawn again.
        None: every row."""
        moved = self.target_r
        if self.config.stop_at_r <= 0 or not moved or len(moved) < 2:
            return None
        unfixed = [index for index, r in enumerate(moved) if r is None or r < self.config.stop_at_r]
        if not unfixed or len(unfixed) == len(moved):
            return None
        return torch.nonzero(torch.isin(self.sets.target_states.label, torch.tensor(unfixed)), as_tuple=True)[0]

    def _refresh_target_states(self) -> None:
        """Re-record the targets' trajectories with the adapter as trained so far: the states the
        model now visits from the target seeds are the ones that decide the output. The recorded
        outputs give r, how far each target has moved toward its surrogate (the least is kept)."""
        from unlearn_core.metrics import toward_surrogate

        self.denoiser.eval()
        config = self.config
        self.sets.target_states = record_target_states(self.model, self.sets.targets, config.generation_steps, config.guidance_scale)
        self.denoiser.train()
        if self.sets.pictures:
            self.target_r = [toward_surrogate(image, target, surrogate).r for image, (target, surrogate) in zip(self.sets.target_states.images, self.sets.pictures)]

    def _climbing_slowly(self) -> bool:
        """Whether to check the neighbours now: checks are on, the target is short of stop_at_r and
        not being consolidated, r gained less than NEIGHBOUR_CHECK_CLIMB over the last
        NEIGHBOUR_CHECK_EVERY steps, and the last check was at least that long ago."""
        config, r = self.config, self.toward_surrogate
        earlier = self._r_at(self.step - NEIGHBOUR_CHECK_EVERY)
        if not (config.neighbour_checks and self.sets.neighbours and config.stop_at_r > 0) or self.consolidating_since is not None:
            return False
        if r is None or earlier is None or r >= config.stop_at_r or self.step - self.last_neighbour_check < NEIGHBOUR_CHECK_EVERY or self.neighbours_settled:
            return False
        return r - earlier < NEIGHBOUR_CHECK_CLIMB

    def _r_at(self, step: int) -> float | None:
        """The least target r as it stood at `step` (the log's row of it; None before step 1 or before a refresh)."""
        return self.log[step - 1]["toward_surrogate"] if 1 <= step <= len(self.log) else None

    def _neighbours_least_ssim(self) -> float:
        """Sample the target's nearest remember seeds with the adapter as trained so far; the least
        SSIM of one to its frozen image."""
        from unlearn_core import metrics

        neighbours, worst = self.sets.neighbours, 1.0
        self.denoiser.eval()
        for prompt in dict.fromkeys(prompt for prompt, _, _ in neighbours):
            seeds, frozen = [seed for p, seed, _ in neighbours if p == prompt], [image for p, _, image in neighbours if p == prompt]
            after = [image for image, _ in self.model.generate(prompt, seeds, self.config.generation_steps, self.config.guidance_scale)]
            worst = min(worst, min(metrics.ssim(frozen, after).per_pair))
        self.denoiser.train()
        return worst

    def _check_neighbours(self) -> float | None:
        """While the target climbs slowly: halve the remember weight if its nearest seeds all keep
        SSIM ≥ NEIGHBOURS_KEPT_SSIM (the slow climb buys nothing), double it back if one fell under
        NEIGHBOURS_LOST_SSIM. The least SSIM, or None when not checked at this step."""
        if not self._climbing_slowly():
            return None
        self.last_neighbour_check = self.step
        worst = self._neighbours_least_ssim()
        scale = self.remember_scale
        if worst >= NEIGHBOURS_KEPT_SSIM:
            self.remember_scale = max(scale / 2, MIN_REMEMBER_SCALE)
        else:
            if worst < NEIGHBOURS_LOST_SSIM:
                self.remember_scale = min(scale * 2, 1.0)
            self.neighbours_settled = scale == 1.0
        return worst

    @property
    def toward_surrogate(self) -> float | None:
        """The least r of the targets at the last refresh (None before one)."""
        return min((r for r in self.target_r if r is not None), default=None)

    def _measures_r_while_training(self) -> bool:
        """Whether this run re-records the targets' trajectories (and so measures r while training)."""
        return measures_r_while_training(self.config)

    def _trajectory_due(self) -> bool:
        return self._measures_r_while_training() and self.step % self.config.trajectory_refresh == 0

    def _fixed(self) -> bool:
        """Early stop: the target seeds' outputs have reached `stop_at_r` (checked at each refresh)."""
        return self.config.stop_at_r > 0 and self.toward_surrogate is not None and self.toward_surrogate >= self.config.stop_at_r

    @property
    def _fixed_floor(self) -> float:
        """The verdict 'fixed', or stop_at_r if set lower."""
        from unlearn_core.metrics import FIXED_AT

        return min(self.config.stop_at_r, FIXED_AT)

    def _forgetting_done(self) -> bool:
        """Where training used to end with the target fixed: r ≥ stop_at_r, or r ≥ the verdict
        'fixed' at or past `steps` (an extension that got there, or a target fixed but short of
        stop_at_r at `steps`)."""
        r = self.toward_surrogate
        return self._fixed() or (self.config.stop_at_r > 0 and r is not None and self.step >= self._planned_steps and r >= self._fixed_floor)

    @property
    def _planned_steps(self) -> int:
        """`steps`, or `steps_when_held` for a target the remember loss holds (`_note_held`)."""
        return max(self.config.steps, self.config.steps_when_held) if self.held else self.config.steps

    def _note_held(self) -> None:
        """At the first refresh at or past `steps`: the target is held if it is not yet fixed there
        and the neighbour checks found its nearest seeds leaving under the full remember weight.
        Such a target crosses r 0.7 slowly while the remember loss pulls its neighbours back, and
        stopping it the moment it crosses leaves them half pulled (belgium-77, training seed 1:
        11/16 same-prompt seeds kept when stopped at step 80 as it reached r 0.70, 14/16 at step 95,
        r 0.73; docs/QUALITY.md), so it trains to `steps_when_held` before a fix ends the job."""
        from unlearn_core.metrics import FIXED_AT

        if self.held is None and self.step >= self.config.steps and self.consolidating_since is None:
            self.held = self.neighbours_settled and self.toward_surrogate is not None and self.toward_surrogate < FIXED_AT

    def _consolidates(self) -> bool:
        return self._measures_r_while_training() and self.config.consolidate_steps > 0

    def _begin_consolidation(self) -> bool:
        """The target is fixed: from the next step on, the heavier remember loss (`_remember_weight`)
        for `consolidate_steps` steps (`step_budget`), or until r falls more than
        CONSOLIDATION_R_SLACK below where it stands now. These weights are the first kept, measured
        now if the last refresh was before this step. False, and no consolidation, when r has less
        than CONSOLIDATION_R_SLACK to spare above `_fixed_floor`: such a fix has no r to trade
        (belgium-77 kept one seed fewer for it, docs/QUALITY.md), and its job ends sooner."""
        if not self._trajectory_due():
            self._refresh_target_states()
        r = self.toward_surrogate
        if r is None or r - CONSOLIDATION_R_SLACK < self._fixed_floor:
            return False
        self.consolidating_since = self.step
        self.consolidation_floor = r - CONSOLIDATION_R_SLACK
        self._keep_if_holding()
        return True

    def _keep_if_holding(self) -> bool:
        """While consolidating, at each refresh: remember these weights if the fix holds (r at or
        above the floor); False if it does not."""
        if self.toward_surrogate is None or self.toward_surrogate < self.consolidation_floor:
            return False
        self.fixed_weights = {"step": self.step, "target_r": list(self.target_r), "weights": self._trainable_state()}
        return True

    def _end_consolidation(self) -> None:
        """Measure the last weights (re-recording the target if this step did not) and, if the
        heavier remember loss has pulled the target under the floor, restore the last weights that
        held it. Every process holds the same weights and r, so all restore alike."""
        if not self._trajectory_due():
            self._refresh_target_states()
            self._keep_if_holding()
        kept = self.fixed_weights
        if kept is None or kept["step"] == self.step:
            return
        self._load_trainable_state(kept["weights"])
        self.target_r, self.kept_step = kept["target_r"], kept["step"]

    @property
    def _remember_weight(self) -> float:
        """remember_weight times the scale the neighbour checks set (`_check_neighbours`); times
        consolidate_remember_factor while consolidating; times extend_remember_factor once training
        runs past `steps` (unless the checks found the target's neighbours leaving), which it
        does only while a target is not yet fixed (`step_budget`): netherlands-62 (in the quality
        suite), -75 (held back) and -81 (scratch) settle near r 0.65–0.7 under the full weight and
        take 140–170 steps to reach 'fixed'; at half the weight they are fixed by step 100–135,
        keeping every other seed (docs/QUALITY.md)."""
        config = self.config
        weight = config.remember_weight * self.remember_scale
        if self.consolidating_since is not None:
            return weight * config.consolidate_remember_factor
        lighter = self.step >= config.steps and not self.neighbours_settled
        return weight * (config.extend_remember_factor if lighter else 1.0)

    @property
    def step_budget(self) -> int:
        """`config.steps` (`steps_when_held` for a target `_note_held` found held), or up to
        `extend_until_fixed` more once there while a target is still
        short of the verdict 'fixed' (r < FIXED_AT at the last refresh): the operator came for
        the fix, and a slow correction is often on its way (held-back netherlands-75: r 0.57 at
        step 90, fixed at step 130, the remember weight halved meanwhile: `_remember_weight`). A
        target already fixed but short of `stop_at_r` stops at `steps`, so the other seeds pay no
        more for it, and so does a run with stop_at_r 0. Once the target is fixed, the
        `consolidate_steps` after that step."""
        from unlearn_core.metrics import FIXED_AT

        config = self.config
        if self.consolidating_since is not None:
            return self.consolidating_since + config.consolidate_steps
        measured = self._measures_r_while_training() and config.stop_at_r > 0  # stop_at_r 0 asks for exactly `steps`
        short = measured and self.toward_surrogate is not None and self.toward_surrogate < FIXED_AT
        return config.steps + config.extend_until_fixed if self.step >= config.steps and short else self._planned_steps
