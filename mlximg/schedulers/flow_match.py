"""Euler sampling for rectified-flow models, configured from a model's scheduler/scheduler_config.json.

Sigmas run from ~1 (noise) to 0 (image); each step moves the latents by (sigma_next - sigma) * velocity.
The arithmetic is float32 in diffusers' order so schedules match FlowMatchEulerDiscreteScheduler.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import at_least, check_fields, from_dict
from ..loading import read_json
from .shifts import exponential_time_shift, linear_time_shift

# Options of FlowMatchEulerDiscreteScheduler this engine does not implement; a config enabling one is refused.
_UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling")


@dataclass
class FlowMatchConfig:
    """Field names as in diffusers' scheduler_config.json."""

    num_train_timesteps: int = at_least(1, default=1000)
    shift: float = at_least(0, default=1.0)
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = at_least(1, default=256)
    max_image_seq_len: int = at_least(1, default=4096)
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    def __post_init__(self):
        check_fields(self)
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.use_dynamic_shifting and self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len and base_image_seq_len are both {self.max_image_seq_len}: the "
                             "dynamic shift divides by their difference")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal!r}")

    @classmethod
    def from_dict(cls, config: dict, source: str | None = None) -> "FlowMatchConfig":
        enabled = [name for name in _UNSUPPORTED if isinstance(config, dict) and config.get(name)]
        if enabled:
            raise ValueError(f"{source or 'scheduler'}: scheduler options not supported: {', '.join(enabled)}")
        return from_dict(cls, config, source)


class FlowMatchEulerScheduler:
    def __init__(self, config: FlowMatchConfig | None = None):
        self.config = config or FlowMatchConfig()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "FlowMatchEulerScheduler":
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no scheduler config at {path}")
        return cls(FlowMatchConfig.from_dict(read_json(path), str(path)))

    def sigmas(self, num_steps: int, *, mu: float | None = None, sigmas=None) -> np.ndarray:
        """num_steps + 1 float32 sigmas ending in 0.

        `sigmas` overrides the base schedule (pipelines pass linspace(1, 1/N, N)); the default is
        linspace(1, 1/num_train_timesteps, N) as in diffusers. Then the shift: by `mu` when the config
        uses dynamic shifting, else the static `shift`.
        """
        if num_steps < 1:
            raise ValueError(f"steps must be at least 1, got {num_steps}")
        cfg = self.config
        if sigmas is None:
            # diffusers spaces the default schedule in float64 between its float32 training sigmas
            n_train = cfg.num_train_timesteps
            t_max, t_min = n_train * self._train_sigma(1.0), n_train * self._train_sigma(1 / n_train)
            sigmas = np.linspace(t_max, t_min, num_steps) / n_train
        else:
            sigmas = np.asarray(sigmas, dtype=np.float32)
        if len(sigmas) != num_steps:
            raise ValueError(f"got {len(sigmas)} sigmas for {num_steps} steps")
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this scheduler uses dynamic shifting: pass mu")
            shift = exponential_time_shift if cfg.time_shift_type == "exponential" else linear_time_shift
            sigmas = shift(mu, sigmas)
        else:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        if cfg.shift_terminal:
            one_minus = 1 - sigmas
            if one_minus[-1] == 0:
                raise ValueError(f"shift_terminal needs a schedule ending below sigma 1 (steps={num_steps})")
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        return np.append(sigmas.astype(np.float32), np.float32(0.0))

    def _train_sigma(self, sigma: float) -> float:
        """A training-schedule sigma as diffusers stores it: float32, statically shifted unless dynamic."""
        sigma = np.float32(sigma)
        if not self.config.use_dynamic_shifting:
            shift = self.config.shift
            sigma = shift * sigma / (1 + (shift - 1) * sigma)
        return float(np.float32(sigma))

    def timesteps(self, sigmas: np.ndarray) -> np.ndarray:
        """The scheduler's timesteps (sigma x num_train_timesteps) for each step, float32."""
        return (sigmas[:-1] * np.float32(self.config.num_train_timesteps)).astype(np.float32)

    @staticmethod
    def step(velocity, latents, sigma: float, sigma_next: float):
        """One Euler step from sigma to sigma_next."""
        return latents + (sigma_next - sigma) * velocity
