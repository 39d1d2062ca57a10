"""How far a flow-matching schedule is shifted towards high noise: static shift, or mu from the image size."""

import math


def calculate_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
    base_shift: float = 0.5, max_shift: float = 1.15,
) -> float:
    """mu interpolated linearly in the number of image tokens (FLUX.1, Z-Image with dynamic shifting)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's mu, fitted over image tokens and step count (from the diffusers FLUX.2 pipelines)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    mu_200_steps = a2 * image_seq_len + b2
    mu_10_steps = a1 * image_seq_len + b1
    slope = (mu_200_steps - mu_10_steps) / 190.0
    return float(slope * num_steps + mu_200_steps - 200.0 * slope)


def exponential_time_shift(mu: float, sigmas):
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def linear_time_shift(mu: float, sigmas):
    return mu / (mu + (1 / sigmas - 1))
