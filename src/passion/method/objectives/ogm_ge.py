"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022 (reference code: GeWu-Lab/OGM-GE_CVPR2022).

Mechanism: the loss is the plain baseline loss. At every step each modality's confidence
s_m (the softmax probability of the true label from that modality's own head) is compared
with the others by the discrepancy ratio rho_m; after backward, the gradients of a dominant
modality's encoder (rho_m > 1) are scaled by k_m = 1 - tanh(alpha * rho_m), the others keep
k_m = 1, so the weak modality catches up. GE then adds Gaussian noise N(0, std(grad)^2) to
every modulated gradient, which restores the gradient's scale as SGD noise and improves
generalisation. Modulation is active for epochs in [modulation_starts, modulation_ends).

What had to be adapted for segmentation with per-modality encoders and missing modalities:
- per-modality head: the backbone's shared single-modality decoder on modality m's encoder
  features (``decode_single``) plays the role of OGM-GE's unimodal slice of the fusion head;
- confidence: s_m is the class-balanced mean softmax probability of the true class (mean over
  the classes present in the patch of the mean over their voxels; background would otherwise
  decide everything), averaged over the available (b, m) pairs of the batch; the per-modality
  sums and pair counts are all-reduced (summed over DDP ranks) before any ratio is taken;
- more than two modalities: rho_m = s_m / mean of s_k over the OTHER modalities seen in the
  (global) batch; a modality not seen in the batch, or seen alone, gets k_m = 1;
- what is modulated: the gradients of ``model.modality_parameters(m)`` (modality m's
  encoder, the backbones' declared per-modality parameters), restricted like the reference to
  multi-dimensional weights (convolution/linear kernels, not biases or norm affines); the
  shared fusion/single decoders are never modulated;
- GE noise is drawn from a generator seeded by (options.noise_seed, step), identical on every
  rank (gradients are DDP-synchronised before the hook, so all ranks stay bit-identical) and
  reproducible on resume (the step counter is in the objective state);
- the reference's epoch-window check can never be true (so it modulates in every epoch);
  here the window is applied as documented.
Options (paper / reference defaults): alpha 0.1, modulation_starts 0, modulation_ends 50
(null: never stop), ge true (false: plain OGM), noise_seed 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...models.interface import to_device
from ...utils import PassionError
from .base import ModulationWindow, ObjectiveOutput, Objective, PendingStats, StatInfo, register_objective
from .terms import (SEG_STATS, class_balanced_true_prob, modality_sums, ratio_to_others, scatter_pairs, seg_terms,
                    stats_of)

NOISE_STREAM = 1_000_003  # separates the noise seeds of consecutive steps for different base seeds


def ogm_coefficients(ratio: Tensor, alpha: float) -> Tensor:
    """k_m = 1 - tanh(alpha * rho_m) where rho_m > 1 (dominant), else 1 (Eq. 10 of the paper)."""
    return torch.where(ratio > 1, 1.0 - torch.tanh(alpha * ratio), torch.ones_like(ratio)).float()


@dataclass
class OGMGEOptions(ModulationWindow):
    alpha: float = 0.1
    modulation_ends: int | None = 50
    ge: bool = True  # false: plain OGM (no noise)
    noise_seed: int = 0

    def rules(self):
        yield "alpha", self.alpha > 0, "must be > 0"
        yield from super().rules()


@register_objective("ogm_ge")
class OGMGEObjective(Objective):
    """Baseline loss + OGM-GE gradient modulation of the per-modality encoders (see module doc)."""

    options_type = OGMGEOptions
    stats = {**SEG_STATS,
             "confidence": StatInfo("class-balanced true-class probability"),
             "ratio": StatInfo("confidence ratio ρ to the other modalities"),
             "ogm_coeff": StatInfo("encoder gradient scale k"),
             "ge_noise_std": StatInfo("GE gradient noise std")}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0  # modulated steps so far: the GE noise stream position
        self.coeff = torch.ones(self.num_modalities)
        self._active = False

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], epoch: int) -> ObjectiveOutput:
        terms = seg_terms(self, model, batch, epoch)
        sep_m = terms.sep_m
        loss = terms.l_fuse + terms.l_aux + sep_m.sum()

        conf = class_balanced_true_prob(terms.probs, terms.y_pairs)
        conf_bm = scatter_pairs(conf, terms.b_idx, terms.m_idx, tuple(terms.a.shape))
        s, n = modality_sums(conf_bm, terms.a, self.all_reduce)
        seen = n > 0
        score = torch.where(seen, s / n.clamp_min(1.0), torch.zeros_like(s))
        ratio = ratio_to_others(score, seen)
        self._active = self.options.modulating(epoch)
        self.coeff = ogm_coefficients(ratio, self.options.alpha) if self._active \
            else torch.ones(self.num_modalities, device=ratio.device)

        scalars = {"loss": loss, "fuse": terms.l_fuse, "aux": terms.l_aux}
        per_mod = {"sep": sep_m, "confidence": score.float(), "ratio": ratio.float(), "ogm_coeff": self.coeff}
        return ObjectiveOutput(loss, stats_of(scalars, per_mod, self.modality_names))

    @torch.no_grad()
    def after_backward(self, model: nn.Module, epoch: int) -> PendingStats | None:
        """Scale modality m's encoder gradients by k_m, then add GE noise (trainer hook, grads unscaled)."""
        if not self._active:
            return None
        if not hasattr(model, "modality_parameters"):
            raise PassionError(f"ogm_ge needs the backbone to declare modality_parameters(m); "
                               f"{type(model).__name__} does not")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.options.noise_seed * NOISE_STREAM + self.steps)
        self.steps += 1
        noise_std = []  # per modality: the mean std of its noised gradients, on the device
        for m in range(self.num_modalities):
            grads = [p.grad for p in model.modality_parameters(m) if p.grad is not None and p.grad.dim() >= 2]
            if grads:
                torch._foreach_mul_(grads, self.coeff[m])  # one call; k stays on the device (no wait for it)
            stds = []
            for g in grads if self.options.ge else []:
                if g.numel() > 1:
                    std = g.float().std() + 1e-8
                    # drawn from the host stream: the same noise on every device and DDP rank
                    noise = torch.randn(g.shape, generator=gen, dtype=torch.float32)
                    g.add_((to_device(noise, g.device) * std).to(g.dtype))
                    stds.append(std)
            noise_std.append(torch.stack(stds).mean() if stds else torch.zeros((), device=self.coeff.device))
        if not self.options.ge:
            return None
        return PendingStats(torch.stack(noise_std), lambda v: {"ge_noise_std": self.per_modality(v)})

    def state_dict(self) -> dict:
        return {"steps": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))

