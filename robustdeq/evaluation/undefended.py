"""Attacks on the undefended model (the evaluation's first families): ready-made PGD, I-FGSM
(paper 2 Eq. 13-14), paper 1's intermediate-state grid (Eq. 11), APGD-CE / APGD-T and Square
(``pyautoattack``); each is scored at every state and transferred to every defense."""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..attacks import IntermediateAttack, ifgsm_steps, intermediate_grid, margin, pgd_linf
from ..dynamics import phantom_forward
from ..stats import correct_string
from .adaptive import readout_logits, surrogate_logits
from .common import BestInput, per_sample_ce, seed_of


class UndefendedAttacks:
    """Mixin of :class:`~robustdeq.evaluation.suite.Evaluator`: the jobs on the undefended model."""

    # ---- jobs: attacks on the undefended model ------------------------------------------
    def _grid(self) -> List[IntermediateAttack]:
        c = self.config
        states = c.states
        if states is None and not c.full_grid:
            states = sorted({1, max(1, round(3 * self.N / 8)), self.k if self.k >= 1 else self.N, self.N})
        return intermediate_grid(self.N, states, c.unrolls, c.lams)

    def strongest_intermediate(self) -> IntermediateAttack:
        """The Eq. 11 surrogate of APGD and the adaptive attacks: the grid attack chosen on the
        validation split (job ``surrogate``). ``run`` schedules that job before every family in
        ``SURROGATE_FAMILIES``; a caller outside them still gets the choice, made here on first
        use, never a fixed fallback (a fixed i = 3, K_a = 5, lambda = 0.5 overstated deq-small's
        robustness by 2-3 points)."""
        return IntermediateAttack(**self._job("surrogate", self._choose_surrogate)["surrogate"])

    def _choose_surrogate(self) -> dict:
        """Run the Eq. 11 grid on ``select_n`` validation images and keep the attack with the
        lowest early-state accuracy (ties: the first). A choice made off the test subset is
        the same in every shard of it."""
        c = self.config
        val = self._validation_split()
        n = min(c.select_n, len(val))
        x_all, y_all = val.images[:n].float().div(255.0), val.labels[:n]
        grid = self._grid()
        acc: Dict[str, float] = {}
        with self._bar(n * len(grid), "Eq. 11 surrogate (validation)") as bar:
            for a in grid:
                correct = 0
                for i in range(0, n, c.batch_size):
                    x, y = x_all[i : i + c.batch_size].to(self.device), y_all[i : i + c.batch_size].to(self.device)
                    gen = torch.Generator().manual_seed(seed_of(c.seed, "surrogate", a.name, i))
                    x_adv = self._pgd(lambda xa, a=a, y=y: per_sample_ce(a.logits(self.model, xa), y), x, y, gen)
                    correct += int((readout_logits(self.model, x_adv).argmax(-1) == y).sum())
                    bar.update(len(y))
                acc[a.name] = correct / n
        best = min(grid, key=lambda a: acc[a.name])
        return {
            "attack": best.name,
            "surrogate": asdict(best),
            "val_n": n,
            "val_acc": acc,
            "split": "validation split of the checkpoint's training run",
        }

    def _pgd(self, loss_fn, x, y, gen, steps=None, step_size=None, eps=None, random_start=True, x_init=None):
        c = self.config
        return pgd_linf(
            loss_fn,
            x,
            c.eps if eps is None else eps,
            c.step_size if step_size is None else step_size,
            c.steps if steps is None else steps,
            random_start=random_start,
            generator=gen,
            x_init=x_init,
        )

    def _tracked_pgd(self, name, surrogate, setting=None, idx=None, steps=None, eps=None, step_size=None,
                     random_start=True, x_start=None, batch=None):  # fmt: skip
        """PGD ascending ``surrogate(x, y) -> (real logits, per-sample loss)``; every iterate's real
        prediction updates the setting's per-sample best (so a fooling iterate counts)."""
        idx = self._all() if idx is None else idx
        key = self._key(setting)
        last: Dict[str, Tensor] = {}

        def fn(chunk, x, y):
            gen = torch.Generator().manual_seed(self._seed(name, chunk))

            def loss_fn(xa):
                real, loss = surrogate(xa, y)
                self.best[key].update(chunk, xa.detach().cpu(), margin(real.detach(), y).cpu())
                return loss

            x_init = None if x_start is None else x_start[chunk].to(self.device)
            x_adv = self._pgd(loss_fn, x, y, gen, steps, step_size, eps, random_start, x_init)
            with torch.no_grad():
                real = self._logits(setting, x_adv)
            m = margin(real, y)
            self.best[key].update(chunk, x_adv.cpu(), m.cpu())
            last.setdefault("x", []).append(x_adv.cpu())
            return m

        self._map(fn, self.x, idx, name, batch)
        return torch.cat(last["x"]) if last else self.x[idx]

    def _plain_surrogate(self, logits_fn: Callable[[Tensor], Tensor]):
        """(real early-state logits, CE of ``logits_fn``) for attacks on the undefended model."""

        def surrogate(xa, y):
            return readout_logits(self.model, xa), per_sample_ce(logits_fn(xa), y)

        return surrogate

    def _ready_made_surrogate(self, n_steps: Optional[int] = None):
        """The ready-made gradient (paper 1 Sec. 4): phantom gradient of z[n_steps] (default z[N])."""
        return self._plain_surrogate(lambda xa: phantom_forward(self.model, xa, n_steps=n_steps).logits)

    def _isolated_pgd(self, label: str, surrogate, idx: Optional[Tensor] = None, **kw) -> Tensor:
        """Run a tracked PGD on the undefended model with its own tracker, so that it does not
        enter the evaluation's worst case; returns the per-sample robust mask."""
        saved = self.best["none"]
        self.best["none"] = BestInput(self.x, torch.tensor(self.jobs["clean"]["margin"]))
        try:
            self._tracked_pgd(label, surrogate, idx=idx, **kw)
            return self.best["none"].robust
        finally:
            self.best["none"] = saved

    def _ready_made_adv(self, name: str) -> Tensor:
        """Ready-made PGD (paper 1 Sec. 4): the phantom gradient of z[N]."""
        return self._tracked_pgd(name, self._ready_made_surrogate())

    def _ifgsm_adv(self, name: str) -> Tensor:
        """I-FGSM of paper 2 (Eq. 13-14): no random start, step 1/255, n from Eq. 14."""
        return self._tracked_pgd(
            name, self._ready_made_surrogate(), steps=ifgsm_steps(self.config.eps), step_size=1 / 255,
            random_start=False,
        )  # fmt: skip

    def _intermediate_adv(self, attack: IntermediateAttack) -> Callable[[str], Tensor]:
        def make(name: str) -> Tensor:
            return self._tracked_pgd(name, self._plain_surrogate(lambda xa: attack.logits(self.model, xa)))

        return make

    def _apgd_adv(self, kind: str) -> Callable[[str], Tensor]:
        """APGD-CE / APGD-T of the reference AutoAttack code (``pyautoattack``), attacking the
        real early-state prediction through the strongest Eq. 11 gradient."""

        def make(name: str) -> Tensor:
            from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

            attack = self.strongest_intermediate()

            def predict(xa):
                return surrogate_logits(self.model, xa, attack)

            c = self.config
            if kind == "ce":
                apgd = APGDAttack(predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, loss="ce", device=self.device)
            else:
                apgd = APGDAttack_targeted(
                    predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, n_target_classes=c.apgd_targets,
                    device=self.device,
                )  # fmt: skip

            def fn(chunk, x, y):
                return apgd.perturb(x, y)

            return self._map(fn, self.x, self._all(), name)

        return make

    def _square_adv(self, name: str) -> Tensor:
        """Square (black box, margin loss) on the real early-state prediction."""
        from pyautoattack.square import SquareAttack

        c = self.config

        def predict(xa):
            return readout_logits(self.model, xa)

        sq = SquareAttack(predict, n_queries=c.square_queries, eps=c.eps, seed=c.seed, device=self.device)

        def fn(chunk, x, y):
            with torch.no_grad():
                return sq.perturb(x, y)

        return self._map(fn, self.x, self._all(), name)

    def _undefended_attack(self, name: str, make_adv: Callable[[str], Tensor], attack=None) -> dict:
        """Make adversarial inputs on the undefended model, score them at every state, and
        transfer them to every defense where it is still robust."""
        x_adv = make_adv(name)
        k, N = self.k, self.N
        per_state = torch.zeros(N, dtype=torch.long)
        entropies = torch.zeros(N)
        h_clean = torch.tensor(self.jobs["clean"]["entropy_final"])
        m_all, h_all = [], []
        for chunk in self._chunks(self._all()):
            x, y = x_adv[chunk].to(self.device), self.y[chunk].to(self.device)
            with torch.no_grad():
                traj = self.model.trajectory(x)
                per_state += (traj.all_logits(1).argmax(-1) == y.view(-1, 1)).sum(0).cpu()
                entropies += traj.entropies(1).sum(0).cpu()
                m_all.append(margin(traj.logits(k), y).cpu())
                h_all.append(traj.entropy(-1).cpu())
        m, h_adv = torch.cat(m_all), torch.cat(h_all)
        self.best["none"].update(self._all(), x_adv, m)
        transfer = {}
        for d in self.defenses:
            idx = self._robust(d).nonzero().squeeze(1)
            before = len(idx)
            self._evaluate_candidates(d, x_adv, idx, f"{name} -> {d.name}")
            transfer[d.name] = {"attacked": before, "still_robust": int(self._robust(d).sum())}
        correct = m <= 0
        return {
            "attack": attack.name if attack is not None else name,
            "surrogate": None if attack is None else asdict(attack),
            "acc": self._prop(correct),
            "correct": correct_string(correct.tolist()),
            "acc_per_state": (per_state.float() / self.n).tolist(),
            "mean_entropy_per_state": (entropies / self.n).tolist(),
            # paper 1 Eq. 12-13 at z* = z[N]: clean entropy lower than perturbed, and the mean gap
            "P": float((h_clean < h_adv).float().mean()),
            "delta_H": float((h_clean - h_adv).mean()),
            "max_perturbation": float((x_adv - self.x).abs().amax()),
            "worst_case_so_far": self._prop(self._robust(None)),
            "transfer": transfer,
        }

    def _transfer_summary(self) -> dict:
        """The non-adaptive numbers: each defense under every attack made on the undefended model."""
        out = {"none": self._prop(self._robust(None))}
        for d in self.defenses:
            out[d.name] = {**self._prop(self._robust(d)), "correct": correct_string(self._robust(d).tolist())}
        out["none"]["correct"] = correct_string(self._robust(None).tolist())
        return out
