"""Adaptive attacks on the entropy-reduction defense (paper 1 Algorithm 1): BPDA, the full
unroll with a smooth sign(), the gate-aware attack and Square through the whole pipeline,
each on the inputs that every earlier attack left correct."""

from __future__ import annotations

import torch

from ..attacks import margin, straight_through
from ..defense import DefenseSetting
from ..stats import correct_string
from .adaptive import defended_logits, defended_surrogate_logits, gate_aware_loss
from .common import per_sample_ce

# The full unroll keeps a second-order graph of all N / T_f * R entropy steps alive (about
# 100 MB per image for deq-tiny at T_f = 2, R = 10), so it runs in small batches.
UNROLL_BATCH = 25


class DefenseAttacks:
    """Mixin of :class:`~robustdeq.evaluation.suite.Evaluator`: the adaptive jobs per defense setting."""

    # ---- jobs: adaptive attacks on the defenses -----------------------------------------
    def _adaptive_pgd(self, d: DefenseSetting, mode: str) -> dict:
        attack = self.strongest_intermediate()
        idx = self._robust(d).nonzero().squeeze(1)
        before = len(idx)
        if before:

            def surrogate(xa, y):
                real, surr = defended_surrogate_logits(self.model, xa, d, attack, mode)
                return real, per_sample_ce(surr, y)

            self._tracked_pgd(
                f"{d.name}/{mode}", surrogate, setting=d, idx=idx, steps=self.config.adaptive_steps,
                x_start=self.best[d.name].x, batch=UNROLL_BATCH if mode == "unroll" else None,
            )  # fmt: skip
        return self._adaptive_record(d, mode, before, attack)

    def _gate_aware(self, d: DefenseSetting) -> dict:
        attack = self.strongest_intermediate()
        idx = self._robust(d).nonzero().squeeze(1)
        before = len(idx)
        if before:

            def surrogate(xa, y):
                return defended_logits(self.model, xa, d), gate_aware_loss(self.model, xa, y, d, attack)

            self._tracked_pgd(
                f"{d.name}/gate-aware", surrogate, setting=d, idx=idx, steps=self.config.adaptive_steps,
            )  # fmt: skip
        return self._adaptive_record(d, "gate-aware", before, attack)

    def _adaptive_apgd_t(self, d: DefenseSetting, mode: str) -> dict:
        """Targeted APGD (pyautoattack's APGD-T, ``defended_apgd_targets`` target classes of
        ``defended_apgd_iters`` iterations each) through BPDA or the full unroll, on the inputs
        every earlier attack left correct; its candidates are scored by the real pipeline."""
        from pyautoattack.autopgd_base import APGDAttack_targeted

        c = self.config
        attack = self.strongest_intermediate()
        idx = self._robust(d).nonzero().squeeze(1)
        before = len(idx)
        if before:

            def predict(xa):
                if not (torch.is_grad_enabled() and xa.requires_grad):  # APGD's bookkeeping calls: the value only
                    return defended_logits(self.model, xa, d)
                return straight_through(*defended_surrogate_logits(self.model, xa, d, attack, mode))

            apgd = APGDAttack_targeted(
                predict, n_iter=c.defended_apgd_iters, eps=c.eps, seed=c.seed,
                n_target_classes=c.defended_apgd_targets, device=self.device,
            )  # fmt: skip

            def fn(chunk, x, y):
                adv = apgd.perturb(x, y)
                with torch.no_grad():
                    m = margin(defended_logits(self.model, adv, d), y)
                self.best[d.name].update(chunk, adv.cpu(), m.cpu())
                return m

            self._map(fn, self.x, idx, f"{d.name}/apgd-t-{mode}", UNROLL_BATCH if mode == "unroll" else None)
        rec = self._adaptive_record(d, f"apgd-t-{mode}", before, attack)
        rec["iterations"], rec["targets"] = c.defended_apgd_iters, c.defended_apgd_targets
        return rec

    def _defended_square(self, d: DefenseSetting) -> dict:
        from pyautoattack.square import SquareAttack

        c = self.config
        idx = self._robust(d).nonzero().squeeze(1)[: c.defended_square_n]  # None: every survivor
        before = int(self._robust(d).sum())
        if len(idx):

            def predict(xa):
                return defended_logits(self.model, xa, d)

            sq = SquareAttack(predict, n_queries=c.defended_square_queries, eps=c.eps, seed=c.seed, device=self.device)

            def fn(chunk, x, y):
                with torch.no_grad():
                    adv = sq.perturb(x, y)
                    m = margin(predict(adv), y)
                self.best[d.name].update(chunk, adv.cpu(), m.cpu())
                return m

            self._map(fn, self.x, idx, f"{d.name}/square")
        rec = self._adaptive_record(d, "square", before, None)
        rec["queried"] = len(idx)
        rec["queries"] = c.defended_square_queries
        return rec

    def _adaptive_record(self, d: DefenseSetting, mode: str, before: int, attack) -> dict:
        robust = self._robust(d)
        return {
            "defense": d.name,
            "attack": mode,
            "surrogate": None if attack is None else attack.name,
            "attacked": before,
            "flipped": before - int(robust.sum()),
            "worst_case_so_far": {**self._prop(robust), "correct": correct_string(robust.tolist())},
        }
