"""Post-hoc explanations beside ABN's attention: Grad-CAM, CAM, and deletion/insertion AUC (RISE).

Both CAMs read the perception branch's last stage (``model.last_stage``), whose output the
single-label head pools globally and classifies with ``model.fc``: GAP + FC, so CAM applies.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .metrics import localisation_scores, localisation_summary, part_pointing_scores

METHODS = ("gradcam", "cam")


def perception_maps(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grad-CAM and CAM (N x h x w) of class ``target`` (N,) on the last stage's features A.

    Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of d logit / d A_k (Selvaraju et al.).
    CAM: sum_k w_k A_k with w the class's row of ``fc`` (Zhou et al.); not rectified.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # A leaf when nothing before it needs grad (frozen layers), so d logit / dA still exists.
        captured["a"] = output if output.requires_grad else output.detach().requires_grad_()
        return captured["a"]

    handle = model.last_stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(images).logits
            # Gradients of the activation only: no parameter .grad is touched (safe inside training/DDP).
            (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), captured["a"])
    finally:
        handle.remove()
    features = captured["a"].detach().float()
    alpha = grads.float().mean(dim=(2, 3))
    return {
        "gradcam": F.relu(torch.einsum("nc,nchw->nhw", alpha, features)),
        "cam": torch.einsum("nc,nchw->nhw", model.fc.weight[target].detach().float(), features),
    }


@torch.no_grad()
def class_probability(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(images).logits.float(), dim=1).gather(1, target[:, None])[:, 0]


@torch.no_grad()
def deletion_insertion(
    model: torch.nn.Module, images: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image deletion and insertion AUC (RISE, Petsiuk et al.) of ``saliency`` (N x h x w).

    Pixels are ranked by the saliency upsampled to the input; at step i of ``steps`` the top i/steps
    of them are replaced by (deletion) or restored onto (insertion) the baseline 0, which for
    normalised inputs is the data's mean colour. The AUC is the trapezoid area under the class
    probability over the removed/restored fraction in [0, 1].
    """
    n, _, height, width = images.shape
    up = F.interpolate(saliency[:, None].float(), size=(height, width), mode="bilinear", align_corners=False).flatten(1)
    order = torch.argsort(up, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(height * width, device=up.device).expand(n, -1))
    ranks = ranks.view(n, 1, height, width)
    baseline = torch.zeros_like(images)
    deletion, insertion = [], []
    for i in range(steps + 1):
        top = ranks < round(i * height * width / steps)
        deletion.append(class_probability(model, torch.where(top, baseline, images), target))
        insertion.append(class_probability(model, torch.where(top, images, baseline), target))
    return tuple(torch.trapezoid(torch.stack(curve, dim=1), dx=1.0 / steps, dim=1) for curve in (deletion, insertion))


def check_compare_cam(multi_label: bool) -> None:
    """Grad-CAM and CAM here explain one predicted class; multi-label models have no single one."""
    if multi_label:
        raise ConfigError("eval.compare_cam: supported for single-label tasks only; set eval.compare_cam=false")


def compare_scores(model: torch.nn.Module, images: torch.Tensor, attention: torch.Tensor, predicted: torch.Tensor,
                   boxes: torch.Tensor | None, cfg: dict[str, Any], points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``eval.compare_cam`` per-image scores (N x 1 each): localisation of Grad-CAM and CAM against
    ``boxes`` and part ``points`` (when given), and deletion/insertion AUC of ABN's ``attention`` and of
    Grad-CAM, all for the ``predicted`` class (N,), the one the result tables score."""
    check_compare_cam(model.multi_label)
    images = images.float()
    maps = perception_maps(model, images, predicted)
    scores: dict[str, torch.Tensor] = {}
    size, tolerance = cfg["data"]["image_size"], cfg["eval"]["pointing_tolerance"]
    if boxes is not None:
        for method, cam in maps.items():
            found = localisation_scores(cam[:, None], boxes, size, tolerance)
            scores |= {f"{key}_{method}": found[key] for key in ("pointing", "energy")}
            if points is not None:
                scores[f"parts_{method}"] = part_pointing_scores(cam[:, None], points, size, tolerance)
    steps = cfg["eval"]["deletion_steps"]
    for suffix, saliency in (("", attention[:, 0]), ("_gradcam", maps["gradcam"])):
        deletion, insertion = deletion_insertion(model, images, saliency, predicted, steps)
        scores |= {f"deletion{suffix}": deletion[:, None], f"insertion{suffix}": insertion[:, None]}
    return scores


def compare_summary(scores: dict[str, torch.Tensor], groups: torch.Tensor) -> dict[str, float]:
    """Summary metrics: pointing_game_gradcam, energy_in_box_gradcam (and _cam) when boxes exist,
    pointing_game_parts_gradcam (and _cam) with parts, deletion_auc, insertion_auc, deletion_auc_gradcam,
    insertion_auc_gradcam."""
    summary: dict[str, float] = {}
    for method in METHODS:
        if f"pointing_{method}" in scores:
            # The uniform-map baseline does not depend on the map: ABN's energy_in_box_uniform already says it.
            mine = {"pointing": scores[f"pointing_{method}"], "energy": scores[f"energy_{method}"],
                    "uniform": scores[f"energy_{method}"]}
            if f"parts_{method}" in scores:
                mine["parts"] = scores[f"parts_{method}"]
            found = localisation_summary(mine, groups)
            summary |= {f"{name}_{method}": found[name] for name in ("pointing_game", "energy_in_box", "pointing_game_parts")
                        if name in found}
    for suffix in ("", "_gradcam"):
        for name in ("deletion", "insertion"):
            summary[f"{name}_auc{suffix}"] = float(scores[f"{name}{suffix}"].float().mean())
    return summary
