"""Closed-form oracles for samplers driven by the optimal ε-predictor of Gaussian data.

For data x_0 ~ N(μ, σ²) per pixel, x_t = √ᾱ x_0 + √(1-ᾱ) ε is Gaussian and
E[ε | x_t] = √(1-ᾱ) (x_t − √ᾱ μ) / (ᾱσ² + 1 − ᾱ). Every sampler step is then affine in x
plus independent Gaussian noise, so the output mean and variance follow exactly from
(m, v) -> (a·m + b, a²·v + s²). The moments below are written with the two-time posterior
q(x_s | x_t, x_0) for s < t (Kingma et al. 2021, "Variational Diffusion Models", appendix A),
not with the respaced betas the sampler uses, so they check the respacing independently.
"""

import torch


def optimal_eps_fn(mu: float, sigma: float, alphas_cumprod: torch.Tensor):
    def eps_fn(x_t, t):
        a = alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1))).to(torch.float64)
        eps = (1 - a).sqrt() * (x_t.double() - a.sqrt() * mu) / (a * sigma**2 + 1 - a)
        return eps.to(x_t.dtype)

    return eps_fn


def exact_output_moments(mu, sigma, alphas_cumprod, timesteps, sampler, eta=0.0):
    """Mean and std of the sampler's output when run on the given original timesteps."""
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    ts = [int(t) for t in timesteps]
    for i in reversed(range(len(ts))):
        a_t = float(alphas_cumprod[ts[i]])
        a_s = float(alphas_cumprod[ts[i - 1]]) if i > 0 else 1.0
        # ε̂ = k (x − √a_t μ);  x̂0 = (x − √(1−a_t) ε̂) / √a_t = p·x + q
        k = (1 - a_t) ** 0.5 / (a_t * sigma**2 + 1 - a_t)
        p = (1 - (1 - a_t) ** 0.5 * k) / a_t**0.5
        q = (1 - a_t) ** 0.5 * k * a_t**0.5 * mu / a_t**0.5
        if sampler == "ddpm":
            alpha_ts = a_t / a_s  # α_{t|s}
            c_x0 = a_s**0.5 * (1 - alpha_ts) / (1 - a_t)
            c_xt = alpha_ts**0.5 * (1 - a_s) / (1 - a_t)
            a, b = c_x0 * p + c_xt, c_x0 * q
            s2 = (1 - a_s) / (1 - a_t) * (1 - alpha_ts)
        else:
            s2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            c_eps = (1 - a_s - s2) ** 0.5
            # x_s = √a_s x̂0 + c_eps ε̂ + σ z, with ε̂ = k x − k √a_t μ
            a = a_s**0.5 * p + c_eps * k
            b = a_s**0.5 * q - c_eps * k * a_t**0.5 * mu
        m, v = a * m + b, a * a * v + s2
    return m, v**0.5
