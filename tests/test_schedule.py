import numpy as np
import torch

from diffcodec.schedule import (
    LinearGammaSchedule,
    alpha_sigma,
    pixel_to_unit,
    posterior_coefficients,
    unit_to_pixel,
)


def test_variance_preserving():
    g = np.linspace(-12, 6, 7)
    a, s = alpha_sigma(g)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.log(s**2 / a**2), g, rtol=1e-9)


def test_posterior_matches_gaussian_conditioning():
    """q(z_s|z_t,x) from Bayes on q(z_s|x) q(z_t|z_s): check mean coefficients and variance."""
    gs, gt = -3.0, 1.5
    a_s, s_s = alpha_sigma(np.float64(gs))
    a_t, s_t = alpha_sigma(np.float64(gt))
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    post_var = 1.0 / (1.0 / s_s**2 + a_ts**2 / var_ts)
    coef_z = post_var * a_ts / var_ts
    coef_x = post_var * a_s / s_s**2
    a, b, beta = posterior_coefficients(np.float64(gs), np.float64(gt))
    np.testing.assert_allclose([a, b, beta**2], [coef_z, coef_x, post_var], rtol=1e-9)


def test_torch_and_numpy_agree():
    a1 = posterior_coefficients(torch.tensor(-5.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    a2 = posterior_coefficients(np.float64(-5.0), np.float64(2.0))
    np.testing.assert_allclose([float(v) for v in a1], a2, rtol=1e-12)


def test_learned_schedule_endpoints():
    sch = LinearGammaSchedule(-10.0, 5.0)
    assert float(sch(torch.tensor(0.0)).detach()) == -10.0 and float(sch(torch.tensor(1.0)).detach()) == 5.0
    assert sch.gamma_min.requires_grad and "gamma_max" in dict(sch.named_buffers())
    np.testing.assert_allclose(sch.gammas_f64([0, 0.5, 1]), [-10, -2.5, 5])


def test_pixel_mapping_roundtrip():
    k = np.arange(256)
    assert np.array_equal(unit_to_pixel(pixel_to_unit(k.astype(np.float64))), k)
    assert np.isclose(pixel_to_unit(0.0), -1 + 1 / 256) and np.isclose(pixel_to_unit(255.0), 1 - 1 / 256)
