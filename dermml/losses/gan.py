"""StyleGAN2 training losses: non-saturating logistic loss, lazy R1 on reals, path-length
regularisation and style mixing, as ``training/loss.py`` of NVlabs/stylegan2-ada-pytorch.

``StyleGAN2Loss.accumulate_gradients`` runs one phase and calls ``backward()`` itself, like the
reference: the caller zeroes the optimiser of the phase's network, sets ``requires_grad`` of the
other network to False (as the reference's training loop does, so a G phase leaves no gradients
in D), runs the phase and steps. Lazy regularisation: run ``Greg`` / ``Dreg`` every k-th step with
``gain=k``. Without the reference's custom ops: gradients of gradients come from
``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Phase = str
PHASES = ("Gmain", "Greg", "Gboth", "Dmain", "Dreg", "Dboth")


def r1_penalty(D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], real_img: torch.Tensor,
               real_c: torch.Tensor | None, return_logits: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """R1 penalty per sample, ``|| d sum(D(x, c)) / dx ||^2`` at the real images x ([N]), with
    the graph kept so that it can be backpropagated into D. ``D`` is any callable
    ``(img, c) -> logits`` (the loss passes augmentation followed by the discriminator).
    ``return_logits`` also returns D's logits on the reals, to reuse them."""
    img = real_img.detach().requires_grad_(True)
    logits = D(img, real_c)
    grads, = torch.autograd.grad(outputs=[logits.sum()], inputs=[img], create_graph=True,
                                 only_inputs=True)
    penalty = grads.square().sum(dim=[1, 2, 3])
    return (penalty, logits) if return_logits else penalty


class StyleGAN2Loss:
    """The StyleGAN2-ADA losses for a ``Generator`` G (with ``mapping`` and ``synthesis``) and a
    ``Discriminator`` D; ``augment_pipe`` (an ``AugmentPipe``) is applied to every image D sees.

    ``pl_mean`` (a buffer, saved by ``state_dict``) is the moving mean of path lengths."""

    def __init__(self, G: nn.Module, D: nn.Module, augment_pipe: nn.Module | None = None,
                 style_mixing_prob: float = 0.9, r1_gamma: float = 10, pl_batch_shrink: int = 2,
                 pl_decay: float = 0.01, pl_weight: float = 2):
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.style_mixing_prob = style_mixing_prob
        self.r1_gamma = r1_gamma
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_weight = pl_weight
        self.pl_mean = torch.zeros([])

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"pl_mean": self.pl_mean.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pl_mean = torch.as_tensor(state["pl_mean"]).detach().clone().to(self.pl_mean)

    # ----------------------------------------------------------------------------- networks
    def run_G(self, z: torch.Tensor, c: torch.Tensor | None, update_emas: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and the ws that made them; with probability ``style_mixing_prob`` the ws
        from a random layer cutoff on come from a second z."""
        ws = self.G.mapping(z, c, update_emas=update_emas)
        if self.style_mixing_prob > 0:
            num_ws = ws.shape[1]
            cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, num_ws)
            cutoff = torch.where(torch.rand([], device=ws.device) < self.style_mixing_prob,
                                 cutoff, torch.full_like(cutoff, num_ws))
            mixed = self.G.mapping(torch.randn_like(z), c, update_emas=False)
            later = torch.arange(num_ws, device=ws.device) >= cutoff
            ws = torch.where(later[None, :, None], mixed, ws)
        return self.G.synthesis(ws), ws

    def run_D(self, img: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return self.D(img, c)

    # ------------------------------------------------------------------------------ phases
    def accumulate_gradients(self, phase: Phase, real_img: torch.Tensor,
                             real_c: torch.Tensor | None, gen_z: torch.Tensor,
                             gen_c: torch.Tensor | None, gain: float = 1.0
                             ) -> dict[str, torch.Tensor]:
        """Run one phase (Gmain, Greg, Gboth, Dmain, Dreg, Dboth): forward, loss ``* gain``,
        ``backward()``. Returns the phase's statistics as detached 0-dim tensors (batch means):
        ``Loss/G/loss``, ``Loss/G/reg``, ``Loss/pl_penalty``, ``Loss/D/loss``, ``Loss/D/reg``,
        ``Loss/r1_penalty``, ``Loss/scores/{real,fake}``, ``Loss/signs/{real,fake}`` (the mean
        sign of D's logits; ``Loss/signs/real`` drives ADA)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
        do_Gmain = phase in ("Gmain", "Gboth")
        do_Dmain = phase in ("Dmain", "Dboth")
        do_Gpl = phase in ("Greg", "Gboth") and self.pl_weight != 0
        do_Dr1 = phase in ("Dreg", "Dboth") and self.r1_gamma != 0
        stats: dict[str, torch.Tensor] = {}

        def report(name: str, value: torch.Tensor) -> None:
            stats[name] = value.detach().float().mean()

        # Gmain: maximise D's logits for generated images.
        if do_Gmain:
            gen_img, _ = self.run_G(gen_z, gen_c)
            gen_logits = self.run_D(gen_img, gen_c)
            report("Loss/scores/fake", gen_logits)
            report("Loss/signs/fake", gen_logits.sign())
            loss_Gmain = F.softplus(-gen_logits)  # -log(sigmoid(logits))
            report("Loss/G/loss", loss_Gmain)
            loss_Gmain.mean().mul(gain).backward()

        # Gpl: path-length regularisation on a shrunk batch.
        if do_Gpl:
            batch = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_img, gen_ws = self.run_G(gen_z[:batch], None if gen_c is None else gen_c[:batch])
            pl_noise = torch.randn_like(gen_img) / math.sqrt(gen_img.shape[2] * gen_img.shape[3])
            pl_grads, = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()],
                                            inputs=[gen_ws], create_graph=True,
                                            only_inputs=True)
            pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
            self.pl_mean = self.pl_mean.to(pl_lengths.device)
            pl_mean = self.pl_mean.lerp(pl_lengths.mean(), self.pl_decay)
            self.pl_mean.copy_(pl_mean.detach())
            pl_penalty = (pl_lengths - pl_mean).square()
            report("Loss/pl_penalty", pl_penalty)
            loss_Gpl = pl_penalty * self.pl_weight
            report("Loss/G/reg", loss_Gpl)
            # gen_img * 0 keeps every synthesis parameter in the graph (DDP), as the reference.
            (gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()

        # Dmain: minimise D's logits for generated images. G runs without a graph: the
        # reference's G has requires_grad False in D phases, so the result is the same.
        loss_Dgen_mean = torch.zeros([])
        if do_Dmain:
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c)
            gen_logits = self.run_D(gen_img, gen_c)
            report("Loss/scores/fake", gen_logits)
            report("Loss/signs/fake", gen_logits.sign())
            loss_Dgen = F.softplus(gen_logits)  # -log(1 - sigmoid(logits))
            loss_Dgen.mean().mul(gain).backward()
            loss_Dgen_mean = loss_Dgen.detach().mean()

        # Dmain: maximise D's logits for reals; Dr1: R1 regularisation on the reals.
        if do_Dmain or do_Dr1:
            if do_Dr1:
                r1, real_logits = r1_penalty(self.run_D, real_img, real_c, return_logits=True)
            else:
                real_logits = self.run_D(real_img.detach(), real_c)
            report("Loss/scores/real", real_logits)
            report("Loss/signs/real", real_logits.sign())
            loss_Dreal: torch.Tensor | float = 0
            if do_Dmain:
                loss_Dreal = F.softplus(-real_logits)
                # per-sample softplus(D(fake)) + softplus(-D(real)), averaged
                report("Loss/D/loss", loss_Dreal.mean() + loss_Dgen_mean)
            loss_Dr1: torch.Tensor | float = 0
            if do_Dr1:
                loss_Dr1 = r1.unsqueeze(1) * (self.r1_gamma / 2)  # [N, 1] like the logits
                report("Loss/r1_penalty", r1)
                report("Loss/D/reg", loss_Dr1)
            (real_logits * 0 + loss_Dreal + loss_Dr1).mean().mul(gain).backward()
        return stats
