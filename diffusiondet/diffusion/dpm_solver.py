"""DPM-Solver++ (Lu et al. 2022, data-prediction form) steps for the box signal: 1st order and 2M.

Shape legend: B images, N proposals. Box tensors are in signal space
``(normalised cxcywh * 2 - 1) * scale``; ᾱ values are floats or tensors broadcastable to them.

Notation (variable -> paper symbol):

    alpha, sigma       -> α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) (variance-preserving marginals)
    lam                -> λ_t = log(α_t / σ_t), the half log-SNR; it grows as t goes to 0
    h                  -> λ_s − λ_t, the step from t (current) to s (next, earlier) in λ
    r                  -> h_prev / h, with h_prev = λ_t − λ_u and u the previous call's time

First order (identical to DDIM with η = 0):  x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·x̂0_t.
Second order multistep (2M):  the same with x̂0_t replaced by
D = (1 + 1/(2r))·x̂0_t − (1/(2r))·x̂0_u, a linear extrapolation of the data prediction in λ.

diffusers' ``DPMSolverMultistepScheduler`` is not used because it keeps one history for the whole
sample on its own timestep grid, while here each proposal has its own history (box renewal
replaces proposals mid-run) and the times are DiffusionDet's integer (t, t_next) pairs.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def _as_tensor(value: Scalar) -> Tensor:
    # Python floats become float64 0-dim tensors: the coefficients keep full precision, and a
    # 0-dim tensor does not promote the (B, N, 4) samples it multiplies.
    return value if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)


def log_snr_terms(alpha_cumprod: Scalar) -> Tuple[Tensor, Tensor, Tensor]:
    """(α, σ, λ) of ᾱ: α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ).

    Args:
        alpha_cumprod: ᾱ in (0, 1), float or tensor.

    Returns:
        three tensors shaped like ``alpha_cumprod`` (0-dim float64 for a float). E.g. ᾱ = 0.5:
        (0.7071, 0.7071, 0.0).
    """
    a = _as_tensor(alpha_cumprod)
    # log1p(−ᾱ) keeps λ accurate when ᾱ is close to 1 (t near 0).
    lam = 0.5 * (torch.log(a) - torch.log1p(-a))
    return torch.sqrt(a), torch.sqrt(1.0 - a), lam


def first_order_coefficients(
    alpha_cumprod_t: Scalar, alpha_cumprod_next: Scalar
) -> Tuple[Tensor, Tensor]:
    """(c_x, c_0) of the first-order step x_s = c_x·x_t + c_0·x̂0 from t to s = t_next.

    c_x = σ_s/σ_t and c_0 = −α_s·(e^{−h} − 1), h = λ_s − λ_t. E.g. ᾱ_t = 0.2, ᾱ_s = 0.5:
    (0.7906, 0.3536).

    Args:
        alpha_cumprod_t: ᾱ_t of the current time.
        alpha_cumprod_next: ᾱ_s of the next (earlier, less noisy) time.

    Returns:
        two tensors broadcast from the inputs.
    """
    alpha_s, sigma_s, lam_s = log_snr_terms(alpha_cumprod_next)
    _, sigma_t, lam_t = log_snr_terms(alpha_cumprod_t)
    h = lam_s - lam_t
    # expm1 avoids the cancellation of e^{−h} − 1 for the small h of many-step runs.
    return sigma_s / sigma_t, -alpha_s * torch.expm1(-h)


def second_order_weights(
    alpha_cumprod_prev: Scalar, alpha_cumprod_t: Scalar, alpha_cumprod_next: Scalar
) -> Tuple[Tensor, Tensor]:
    """(w_t, w_u) of the 2M data estimate D = w_t·x̂0_t + w_u·x̂0_u.

    w_t = 1 + 1/(2r), w_u = −1/(2r), r = (λ_t − λ_u)/(λ_s − λ_t). Equal steps in λ (r = 1) give
    (1.5, −0.5).

    Args:
        alpha_cumprod_prev: ᾱ_u of the previous model call (u > t).
        alpha_cumprod_t: ᾱ_t of the current call.
        alpha_cumprod_next: ᾱ_s of the time being sampled (s < t).

    Returns:
        two tensors broadcast from the inputs.
    """
    _, _, lam_u = log_snr_terms(alpha_cumprod_prev)
    _, _, lam_t = log_snr_terms(alpha_cumprod_t)
    _, _, lam_s = log_snr_terms(alpha_cumprod_next)
    half_inv_r = (lam_s - lam_t) / (2.0 * (lam_t - lam_u))  # 1/(2r)
    return 1.0 + half_inv_r, -half_inv_r


def dpmpp_2m_step(
    x_t: Tensor,
    x0: Tensor,
    alpha_cumprod_t: Scalar,
    alpha_cumprod_next: Scalar,
    previous_x0: Optional[Tensor] = None,
    alpha_cumprod_prev: Optional[Scalar] = None,
    has_history: Optional[Tensor] = None,
) -> Tensor:
    """One DPM-Solver++ step from t to s = t_next, second order where a history exists.

    x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D, with D = x̂0_t (first order) for proposals without
    history and D = (1 + 1/(2r))·x̂0_t − (1/(2r))·x̂0_u (2M) for the others. Deterministic.

    Args:
        x_t: (B, N, 4) current sample (unclamped, as DiffusionDet feeds it to the model).
        x0: (B, N, 4) x̂0_t, the current call's prediction (clamped by the sampler).
        alpha_cumprod_t: ᾱ_t.
        alpha_cumprod_next: ᾱ_s.
        previous_x0: (B, N, 4) x̂0_u of the previous call, slot-aligned with ``x0``; None = the
            first step (first order everywhere).
        alpha_cumprod_prev: ᾱ_u; required with ``previous_x0``.
        has_history: (B, N) bool, which proposals may use ``previous_x0`` (False for proposals
            that were fresh noise at the previous call); None = all of them.

    Returns:
        (B, N, 4) x_s in ``x0``'s dtype.
    """
    coef_x, coef_x0 = first_order_coefficients(alpha_cumprod_t, alpha_cumprod_next)
    data = x0
    if previous_x0 is not None:
        if alpha_cumprod_prev is None:
            raise ValueError("previous_x0 needs alpha_cumprod_prev (ᾱ of the previous call)")
        w_cur, w_prev = second_order_weights(
            alpha_cumprod_prev, alpha_cumprod_t, alpha_cumprod_next
        )
        corrected = w_cur * x0 + w_prev * previous_x0
        if has_history is not None:
            corrected = torch.where(has_history.unsqueeze(-1), corrected, x0)
        data = corrected
    return (coef_x * x_t + coef_x0 * data).to(x0.dtype)
