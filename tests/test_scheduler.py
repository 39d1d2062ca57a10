"""Flow-matching schedules against diffusers' FlowMatchEulerDiscreteScheduler and the pipelines' sigma set-up."""

import numpy as np
import pytest
from oracle import require_oracle, to_numpy

from mlximg.schedulers import FlowMatchConfig, FlowMatchEulerScheduler, calculate_shift, compute_empirical_mu

TOLERANCE = 1e-6
STEP_COUNTS = range(1, 101)
# (height, width) in pixels: square and non-square, small to large.
RESOLUTIONS = [(256, 256), (512, 768), (1024, 1024), (1024, 576), (1536, 2048), (2048, 2048)]
# Z-Image-Turbo's released scheduler config; a dynamic-shifting (FLUX-style) variant; a linear time shift.
ZIMAGE_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
DYNAMIC_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX2_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                "time_shift_type": "exponential"}


def max_error(worst: float, ours, ref) -> float:
    """The running max |ours - ref|; a non-finite value anywhere fails (NaN would slip past max())."""
    ours, ref = np.asarray(ours, np.float64), to_numpy(ref).astype(np.float64)
    assert ours.shape == ref.shape and np.isfinite(ours).all() and np.isfinite(ref).all()
    return max(worst, float(np.abs(ours - ref).max()))


def reference(config: dict):
    require_oracle()
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def test_zimage_schedule_matches_pipeline():
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as ref_shift
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    for config in (ZIMAGE_CONFIG, DYNAMIC_CONFIG):
        ref = reference(config)
        ours = FlowMatchEulerScheduler(FlowMatchConfig.from_dict(config))
        worst = 0.0
        for height, width in RESOLUTIONS:
            seq_len = (height // 16) * (width // 16)
            mu_args = (seq_len, 256, 4096, 0.5, 1.15)
            assert calculate_shift(*mu_args) == pytest.approx(ref_shift(*mu_args), abs=1e-12)
            for steps in STEP_COUNTS:
                ref.set_timesteps(steps, sigmas=get_default_z_image_sigmas(steps), mu=ref_shift(*mu_args))
                sigmas = ours.sigmas(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=calculate_shift(*mu_args))
                # Z-Image's transformer takes t = 1 - sigma, derived from the scheduler's timesteps.
                ref_t = to_numpy((1000 - ref.timesteps) / 1000)
                our_t = (1000 - ours.timesteps(sigmas)) / 1000
                worst = max_error(max_error(worst, sigmas, ref.sigmas), our_t, ref_t)
        print(f"Z-Image schedule {config}: max error {worst:.3g}")
        assert worst <= TOLERANCE, f"{config}: max error {worst:.3g}"


def test_flux2_schedule_matches_pipeline():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as ref_mu

    ref = reference(FLUX2_CONFIG)
    ours = FlowMatchEulerScheduler(FlowMatchConfig.from_dict(FLUX2_CONFIG))
    worst = 0.0
    for height, width in [*RESOLUTIONS, (2048, 4096)]:
        seq_len = (height // 16) * (width // 16)
        for steps in STEP_COUNTS:
            mu = compute_empirical_mu(seq_len, steps)
            assert mu == pytest.approx(ref_mu(seq_len, steps), abs=1e-12)
            base = np.linspace(1.0, 1 / steps, steps)
            ref.set_timesteps(steps, sigmas=base, mu=mu)
            sigmas = ours.sigmas(steps, sigmas=base, mu=mu)
            # FLUX.2's transformer takes timestep / 1000, i.e. sigma.
            ref_t = to_numpy(ref.timesteps / 1000)
            our_t = ours.timesteps(sigmas) / 1000
            worst = max_error(max_error(worst, sigmas, ref.sigmas), our_t, ref_t)
    print(f"FLUX.2 schedule: max error {worst:.3g}")
    assert worst <= TOLERANCE, f"max error {worst:.3g}"


@pytest.mark.parametrize("config", [
    {"shift": 1.0}, {"shift": 3.0}, {"shift": 6.0},
    {**DYNAMIC_CONFIG, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.02},
    {**DYNAMIC_CONFIG, "num_train_timesteps": 500},
], ids=["shift1", "shift3", "shift6", "linear-mu", "terminal", "train500"])
def test_default_schedule_matches_scheduler(config):
    """Without pipeline sigmas, the scheduler's own spacing between its (shifted) training sigmas."""
    ref = reference(config)
    ours = FlowMatchEulerScheduler(FlowMatchConfig.from_dict(config))
    mu = 0.9 if config.get("use_dynamic_shifting") else None
    worst = 0.0
    for steps in STEP_COUNTS[1:] if "shift_terminal" in config else STEP_COUNTS:
        ref.set_timesteps(steps, mu=mu)
        sigmas = ours.sigmas(steps, mu=mu)
        worst = max_error(worst, sigmas, ref.sigmas)
        worst = max_error(worst, ours.timesteps(sigmas) / 1000, ref.timesteps / 1000)
    print(f"default schedule {config}: max error {worst:.3g}")
    assert worst <= TOLERANCE, f"max error {worst:.3g}"


def test_euler_steps_match_scheduler(rng):
    torch = require_oracle()
    ref = reference(ZIMAGE_CONFIG)
    ours = FlowMatchEulerScheduler(FlowMatchConfig.from_dict(ZIMAGE_CONFIG))
    steps = 8
    ref.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    sigmas = ours.sigmas(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    latents = rng.standard_normal((1, 16, 8, 12)).astype(np.float32)
    ref_latents = torch.from_numpy(latents)
    for i, t in enumerate(ref.timesteps):
        velocity = rng.standard_normal(latents.shape).astype(np.float32)
        ref_latents = ref.step(torch.from_numpy(velocity), t, ref_latents, return_dict=False)[0]
        latents = ours.step(velocity, latents, sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(latents, ref_latents.numpy(), atol=1e-6)


def test_bad_scheduler_input():
    with pytest.raises(ValueError, match="at least 1"):
        FlowMatchEulerScheduler().sigmas(0)
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchEulerScheduler(FlowMatchConfig.from_dict(DYNAMIC_CONFIG)).sigmas(4)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="3 sigmas for 4 steps"):
        FlowMatchEulerScheduler().sigmas(4, sigmas=[1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="shift_terminal"):
        FlowMatchEulerScheduler(FlowMatchConfig.from_dict({"shift_terminal": 0.02})).sigmas(1)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        FlowMatchEulerScheduler.from_pretrained("/nonexistent")


def test_reads_scheduler_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": false}')
    scheduler = FlowMatchEulerScheduler.from_pretrained(tmp_path)
    assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
