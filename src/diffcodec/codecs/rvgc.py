"""RVGC: a rate-variable latent codec with a few-step diffusion decoder (after Han et al., DESIGN §2).

Encoder: y = g_a(x); a continuous quantisation step q > 0 is the rate knob; y is coded as
k = round((y - mu) / q) under a Gaussian conditional N(mu, sigma^2) integrated over the bin, with
(mu, sigma) from a hyperprior h_s(z_hat, q) (z = h_a(y, q) coded under a factorised logistic prior
that also depends on q).  Larger q = fewer bits, from one model.  The bitstream carries q.

Decoder: y_hat = mu + k q.  Increasing q is read as a forward diffusion in latent space,
y_q = y + q u with u ~ U(-1/2, 1/2); a latent U-Net conditioned on the noise level l estimates
E[y | y_l] (Tweedie, as an estimate of u), and a stochastic sampler walks the level from q down to
0 in a few steps, starting from the decoded latent itself (no Gaussian-noise start) and injecting
fresh uniform noise with weight ``eta`` (the randomness schedule).  g_s then maps the sampled latent
to pixels.  ``deterministic`` decoding is the plain g_s(y_hat, q) of a learned codec, for comparison.

One training loss, q drawn log-uniformly per example:
    bpp + lambda(q) * MSE_255(x, g_s(y + q u, q)) + E_l ||u_hat(y + l u, l) - u||^2
with lambda(q) log-linear in log q (high quality at q_min, low at q_max).  The denoising term uses
y detached: it trains the reverse process without pulling the latent toward what is easy to denoise.

Determinism (DESIGN §4): everything that feeds a coding table is computed in float64 from exact
inputs (integers z_hat, the float64 q from the file) and rounded to fixed grids; Gaussian scales
are snapped to a 64-level table by an integer index (``entropy.scale_index``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..entropy import (
    SCALE_MAX,
    SCALE_MIN,
    decode_categorical,
    decode_gaussian,
    encode_categorical,
    encode_gaussian,
    logistic_tables,
    quantize_to_grid,
    scale_index,
    symbols_crc,
)
from ..errors import DecodeError, DiffcodecError, FormatError
from ..networks import DenoiserUNet, UNetConfig
from ..schedule import LOG2, unit_to_pixel
from ..texture import detail_energy_loss
from ..transforms import Analysis, HyperAnalysis, HyperSynthesis, RateEmbedding, Synthesis, widen_synthesis
from .base import Section
from .uqdm import log_logistic_bin_t

KIND_HYPER, KIND_LATENT = 2, 3  # section kinds: hyper-latent z, then latent y
MU_GRID_BITS = 10
LOGS_GRID_BITS = 8
EPS_GRID_BITS = 12
MAX_HALF_WIDTH = 1 << 15  # latent symbols: the quantised-Gaussian coder's cost does not grow with the range
MAX_Z_HALF_WIDTH = 255  # hyper-latent symbols (table coder: work grows with the range, so it is capped)
PIXEL_SCALE2 = 128.0**2  # MSE in [-1, 1] units -> MSE in 0..255 units
DEN_LEVEL_FLOOR = 1.0 / 8.0  # the denoiser is trained down to q_min / 8 (sampler steps go below q_min)

PRESETS = {
    "tiny": dict(N=8, M=8, Nz=4, emb_dim=16, clean_weight=1.0,
                 den=dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, emb_dim=16)),
    "small": dict(N=64, M=64, Nz=32, emb_dim=64, clean_weight=1.0,
                  den=dict(base_channels=64, channel_mult=(1, 2), num_res_blocks=2, emb_dim=64)),
    "base": dict(N=128, M=128, Nz=64, emb_dim=128, clean_weight=1.0,
                 den=dict(base_channels=128, channel_mult=(1, 2), num_res_blocks=2, emb_dim=128)),
}


ANALYSIS_TILE = 1024  # pixels: g_a and g_s run in tiles of this size (memory bounded for any image)


def tiled(fn, x: np.ndarray, out_channels: int, scale: float, tile: int, halo: int) -> np.ndarray:
    """Apply a convolutional ``fn`` (spatial scale factor ``scale``) to ``x`` in overlapping tiles.

    ``tile`` and ``halo`` are in input units and multiples of the stride, so every tile's output
    aligns with the whole-image output; a halo wider than the receptive field makes tiled and
    untiled results agree up to float64 rounding.  The tiling depends only on the image size, so
    a decoder computes exactly the same thing every time.  Images within one tile plus halo are
    processed whole.
    """
    _, _, H, W = x.shape
    if H <= tile + 2 * halo and W <= tile + 2 * halo:
        return fn(np.ascontiguousarray(x))
    oh, ow = int(round(H * scale)), int(round(W * scale))
    out = np.empty((x.shape[0], out_channels, oh, ow), dtype=np.float64)
    for y0 in range(0, H, tile):
        for x0 in range(0, W, tile):
            y1, x1 = min(H, y0 + tile), min(W, x0 + tile)
            ya, xa = max(0, y0 - halo), max(0, x0 - halo)
            yb, xb = min(H, y1 + halo), min(W, x1 + halo)
            o = fn(np.ascontiguousarray(x[:, :, ya:yb, xa:xb]))
            sy, sx = int(round((y0 - ya) * scale)), int(round((x0 - xa) * scale))
            ty, tx = int(round((y1 - y0) * scale)), int(round((x1 - x0) * scale))
            out[:, :, int(round(y0 * scale)) : int(round(y0 * scale)) + ty,
                int(round(x0 * scale)) : int(round(x0 * scale)) + tx] = o[:, :, sy : sy + ty, sx : sx + tx]
    return out


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def gaussian_bin_bits(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """-log2 P(bin of width 1 around v) under N(0, s^2), evaluated on the upper tail (stable)."""
    a = v.abs()
    lik = _phi((0.5 - a) / s) - _phi((-0.5 - a) / s)
    return -torch.log2(lik.clamp_min(1e-9))


class RVGC(nn.Module):
    codec_id = "rvgc"
    num_steps = 2  # sections: hyper-latent, latent
    downscale = 16
    autocast_bf16: bool = False

    def __init__(self, N: int = 64, M: int = 64, Nz: int = 32, emb_dim: int = 64, den: dict | None = None,
                 q_range: tuple[float, float] = (0.5, 16.0), lambda_range: tuple[float, float] = (0.03, 0.001),
                 in_channels: int = 3, sampler_steps: int = 2, eta: float = 1.0, clean_weight: float = 0.0,
                 sampler_max_q: float | None = None, N_s: int | None = None, refine: int = 0,
                 sampler_max_q_by_pixels: Sequence[Sequence[float]] = ()):
        super().__init__()
        if not 0 < q_range[0] < q_range[1]:
            raise ValueError("q_range must be 0 < q_min < q_max")
        self.N, self.M, self.Nz, self.emb_dim = N, M, Nz, emb_dim
        self.q_range = (float(q_range[0]), float(q_range[1]))
        self.lambda_range = (float(lambda_range[0]), float(lambda_range[1]))
        self.in_channels = in_channels
        self.sampler_steps = int(sampler_steps)
        self.eta = float(eta)
        # decoder default: above this q the plain synthesis is used (where a model's sampler measured
        # less realistic than g_s on held-out photos); None: the sampler at every q
        self.sampler_max_q = None if sampler_max_q is None else float(sampler_max_q)
        # ... and for images of at least ``pixels`` pixels, ``(pixels, max_q)`` pairs: the q where the
        # sampler stops paying rises with the image size (a latent of more positions gives it more
        # context; held-out photos at several sizes, model cards)
        self.sampler_max_q_by_pixels = tuple(sorted((int(px), float(mq)) for px, mq in sampler_max_q_by_pixels))
        if self.sampler_max_q_by_pixels and self.sampler_max_q is None:
            raise ValueError("sampler_max_q_by_pixels refines a sampler_max_q; set that too")
        self.clean_weight = float(clean_weight)
        log_lo = math.log(self.q_range[0] * DEN_LEVEL_FLOOR)
        log_hi = math.log(self.q_range[1])
        self.embed = RateEmbedding(emb_dim, (log_lo, log_hi))
        self.g_a = Analysis(N, M, in_channels)
        # g_s may be wider than g_a (N_s) and have a full-resolution head (refine): decoder upgrades
        # grown from a trained model by ``with_decoder`` keep its encoder, so images code the same way
        self.N_s, self.refine = int(N_s or N), int(refine)
        self.g_s = Synthesis(self.N_s, M, emb_dim, in_channels, self.refine)
        self.h_a = HyperAnalysis(M, N, Nz, emb_dim)
        self.h_s = HyperSynthesis(Nz, N, M, emb_dim)
        self.z_prior = nn.Linear(emb_dim, 2 * Nz)
        nn.init.zeros_(self.z_prior.weight)
        nn.init.zeros_(self.z_prior.bias)
        den_cfg = UNetConfig.from_dict({**(den or PRESETS["small"]["den"]), "in_channels": M, "out_channels": M,
                                        "gamma_range": (log_lo, log_hi)})
        self.den = DenoiserUNet(den_cfg)
        # per-channel second moment of y (EMA over training): input scaling of the latent denoiser
        self.register_buffer("y_var", torch.ones(M))

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: dict) -> RVGC:
        keys = ("N", "M", "Nz", "emb_dim", "den", "q_range", "lambda_range", "in_channels", "sampler_steps", "eta",
                "clean_weight", "sampler_max_q", "N_s", "refine", "sampler_max_q_by_pixels")
        kw = {k: cfg[k] for k in keys if k in cfg}
        for k in ("q_range", "lambda_range"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    @classmethod
    def preset_config(cls, name: str) -> dict:
        return {"codec": cls.codec_id, **PRESETS[name]}

    def config_dict(self) -> dict:
        den = self.den.config.to_dict()
        return {"codec": self.codec_id, "N": self.N, "M": self.M, "Nz": self.Nz, "emb_dim": self.emb_dim,
                "den": {k: den[k] for k in ("base_channels", "channel_mult", "num_res_blocks", "emb_dim")},
                "q_range": list(self.q_range), "lambda_range": list(self.lambda_range),
                "in_channels": self.in_channels, "sampler_steps": self.sampler_steps, "eta": self.eta,
                "clean_weight": self.clean_weight,
                **({"sampler_max_q": self.sampler_max_q} if self.sampler_max_q is not None else {}),
                **({"sampler_max_q_by_pixels": [list(p) for p in self.sampler_max_q_by_pixels]}
                   if self.sampler_max_q_by_pixels else {}),
                **({"N_s": self.N_s} if self.N_s != self.N else {}),
                **({"refine": self.refine} if self.refine else {})}

    def with_decoder(self, N_s: int, refine: int) -> RVGC:
        """A copy with a wider synthesis transform (``N_s`` hidden channels, a ``refine``-channel
        full-resolution head) that decodes like this model (to ~1e-6, ``transforms.widen_synthesis``)
        and has the same encoder, hyperprior and latent denoiser: the start of a decoder upgrade by
        ``train --decoder-only --decoder-width/--decoder-refine``."""
        new = RVGC.from_config({**self.config_dict(), "N_s": N_s, "refine": refine})
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("g_s.")}
        missing = new.load_state_dict(state, strict=False).missing_keys
        assert all(k.startswith("g_s.") for k in missing), missing  # everything but g_s is carried over
        new.g_s = widen_synthesis(self.g_s, N_s, refine).to(next(self.parameters()).dtype)
        return new

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def clean_level(self) -> float:
        """The noise level g_s is told after sampling: the embedding floor if it was trained on clean
        latents there (``clean_weight`` > 0), else q_min."""
        return self.q_range[0] * DEN_LEVEL_FLOOR if self.clean_weight > 0 else self.q_range[0]

    # ------------------------------------------------------------------ header parameters
    def header_params(self, q: float) -> bytes:
        """The file's codec parameters: the quantisation step q as a float64 (exactly what was used)."""
        return struct.pack("<d", float(q))

    @staticmethod
    def parse_header_params(params: bytes) -> dict:
        if len(params) != 8:
            raise FormatError("malformed rvgc parameters")
        (q,) = struct.unpack("<d", params)
        if not (math.isfinite(q) and q > 0):
            raise FormatError("malformed rvgc parameters (q)")
        return {"q": q}

    def check_header_params(self, params: bytes) -> dict:
        p = self.parse_header_params(params)
        self.check_q(p["q"])
        return p

    def check_q(self, q: float) -> float:
        lo, hi = self.q_range
        if not (math.isfinite(q) and lo <= q <= hi):
            raise DiffcodecError(f"q={q:g} is outside the range of model {getattr(self, 'model_id', 'rvgc')} "
                                 f"[{lo:g}, {hi:g}]")
        return float(q)

    def lmbda(self, q: torch.Tensor) -> torch.Tensor:
        """Rate-distortion weight lambda(q): log-linear from lambda_range[0] at q_min to [1] at q_max."""
        lo, hi = (math.log(v) for v in self.q_range)
        l0, l1 = (math.log(v) for v in self.lambda_range)
        t = (torch.log(q) - lo) / (hi - lo)
        return torch.exp(l0 + (l1 - l0) * t)

    # ------------------------------------------------------------------ shared pieces
    @staticmethod
    def _pad_to(x: torch.Tensor, m: int) -> torch.Tensor:
        ph, pw = -x.shape[-2] % m, -x.shape[-1] % m
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def hyper_analysis(self, y: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.h_a(self._pad_to(y, 4), emb)

    def hyper_synthesis(self, z: torch.Tensor, emb: torch.Tensor, hw: tuple[int, int]):
        out = self.h_s(z, emb)[:, :, : hw[0], : hw[1]]
        return out[:, : self.M], out[:, self.M :]

    def denoiser_eps(self, y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """u_hat(y_l, l): the estimated unit-uniform noise of a latent at noise level l (per example)."""
        lv = level.reshape(-1, 1, 1, 1)
        c_in = torch.rsqrt(self.y_var.to(y.dtype)[None, :, None, None] + lv * lv / 12.0)
        h, w = y.shape[-2:]
        out = self.den(self._pad_to(y * c_in, self.den.downscale), torch.log(level.reshape(-1)))
        return out[:, :, :h, :w]

    # ------------------------------------------------------------------ training loss
    def forward(self, x: torch.Tensor, all_steps: bool = False, decoder: bool = False,
                detail_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Per-example training loss (``loss``) and its parts; ``all_steps`` is accepted for the trainer.

        ``decoder=True`` is the decoder fine-tuning pass instead (``decoder_forward``, with its
        ``detail_weight``); it goes through ``forward`` so that DistributedDataParallel synchronises its
        gradients.
        """
        if decoder:
            return self.decoder_forward(x, detail_weight)
        B = x.shape[0]
        lo, hi = (math.log(v) for v in self.q_range)
        q = torch.exp(lo + (hi - lo) * torch.rand(B, device=x.device, dtype=x.dtype))
        qv = q.view(B, 1, 1, 1)
        use_bf16 = self.autocast_bf16 and x.device.type == "cpu"

        def run(fn, *args):  # networks under bf16 autocast (2x faster on CPU); rates in fp32
            if use_bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn(*args).float()
            return fn(*args)

        emb = run(self.embed, torch.log(q))
        y = run(self.g_a, x)
        if self.training:
            with torch.no_grad():
                self.y_var.lerp_(y.detach().pow(2).mean(dim=(0, 2, 3)), 0.01)
        y_t = y + qv * (torch.rand_like(y) - 0.5)
        z = run(self.hyper_analysis, y, emb)
        z_t = z + torch.rand_like(z) - 0.5
        hs = run(lambda zz, ee: torch.cat(self.hyper_synthesis(zz, ee, y.shape[-2:]), 1), z_t, emb)
        mu, log_sigma = hs[:, : self.M], hs[:, self.M :]
        s = torch.exp(log_sigma - torch.log(qv)).clamp(SCALE_MIN, SCALE_MAX)
        bits_y = gaussian_bin_bits((y_t - mu) / qv, s).flatten(1).sum(1)
        zp = self.z_prior(emb)
        zmu, zlogs = zp[:, : self.Nz, None, None], zp[:, self.Nz :, None, None]
        inv = torch.exp(-zlogs)
        bits_z = -log_logistic_bin_t((z_t - zmu - 0.5) * inv, (z_t - zmu + 0.5) * inv).flatten(1).sum(1) / LOG2
        x_hat = run(self.g_s, y_t, emb)
        mse = (x_hat - x).pow(2).flatten(1).mean(1) * PIXEL_SCALE2
        pixels = x.shape[-1] * x.shape[-2]
        bpp = (bits_y + bits_z) / pixels
        # latent denoising (Tweedie) term at a random level, on the detached latent
        llo = math.log(self.q_range[0] * DEN_LEVEL_FLOOR)
        level = torch.exp(llo + (hi - llo) * torch.rand(B, device=x.device, dtype=x.dtype))
        u = torch.rand_like(y) - 0.5
        u_hat = run(self.denoiser_eps, y.detach() + level.view(B, 1, 1, 1) * u, level)
        den = (u_hat - u).pow(2).flatten(1).mean(1) * 12.0  # 1.0 = no better than predicting 0
        loss = bpp + self.lmbda(q) * mse + den
        out = {}
        if self.clean_weight > 0:
            # the decoder of a clean latent (what the sampler produces), at the bottom of the level range
            lv = torch.full((B,), math.log(self.clean_level), device=x.device, dtype=x.dtype)
            x_clean = run(self.g_s, y, run(self.embed, lv))
            mse_clean = (x_clean - x).pow(2).flatten(1).mean(1) * PIXEL_SCALE2
            loss = loss + self.clean_weight * self.lambda_range[0] * mse_clean
            out["mse_clean"] = mse_clean
        return {**out, "loss": loss, "bpd": loss, "bpp": bpp, "mse": mse,
                "psnr": 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10)), "den": den, "q": q}

    # ------------------------------------------------------------------ decoder fine-tuning
    def decoder_parameters(self) -> list[nn.Parameter]:
        """What decoder fine-tuning (``train --decoder-only`` / ``--gan-weight``) trains: g_s only.
        Everything a file's bits depend on (g_a, the rate embedding, the hyperprior) and the latent
        denoiser stay as they are."""
        return list(self.g_s.parameters())

    def quantized_latent(self, y: torch.Tensor, q: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat = mu + round((y - mu) / q) q with mu from the rounded hyper-latent: what a decoder
        receives (``encode_latent``'s arithmetic in the working precision, q per example; ``emb`` is the
        rate embedding of q if the caller has it)."""
        B = y.shape[0]
        emb = self.embed(torch.log(q)) if emb is None else emb
        z_hat = torch.round(self.hyper_analysis(y, emb))
        mu, _ = self.hyper_synthesis(z_hat, emb, y.shape[-2:])
        mu = torch.round(mu * 2.0**MU_GRID_BITS) / 2.0**MU_GRID_BITS
        qv = q.view(B, 1, 1, 1)
        return mu + torch.round((y - mu) / qv) * qv

    def decoder_forward(self, x: torch.Tensor, detail_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """One decoder fine-tuning pass through both decoders the codec uses, at a random q per example.

        The decoders get the *really quantised* latent y_hat (``quantized_latent``), not the training
        proxy y + q u: with the encoder frozen nothing needs a gradient through the rounding, and the
        two are distributed differently (many elements of y_hat sit exactly on the prior mean, none
        of y + q u do), so only y_hat trains the decoder for what it will be given.
        ``x_hat = g_s(y_hat, q)`` is the plain decoder (used above ``sampler_max_q``); ``x_sampled =
        g_s(y_s, clean level)`` decodes the latent the model's own sampler (``sampler_walk``, its
        default steps and eta) recovers from y_hat, i.e. exactly what the default decoder feeds g_s.
        Both are returned with y_hat (``y_t``) for a latent-conditioned discriminator.  The frozen
        parts run without gradients; ``loss`` is per example lambda(q) (MSE + MSE_sampled), plus, with a
        ``detail_weight`` W, lambda(q) W (D + D_sampled) where D is the detail-energy loss of each
        decoder's output (``texture.detail_energy_loss``, in the MSE's units): texture of the right
        strength where the MSE alone would smooth it away.
        """
        B = x.shape[0]
        lo, hi = (math.log(v) for v in self.q_range)
        q = torch.exp(lo + (hi - lo) * torch.rand(B, device=x.device, dtype=x.dtype))
        with torch.no_grad():
            emb = self.embed(torch.log(q))
            emb_clean = self.embed(torch.full((B,), math.log(self.clean_level), device=x.device, dtype=x.dtype))
            y_t = self.quantized_latent(self.g_a(x), q, emb)
            y_s = self.sampler_walk(y_t, q, max(1, self.sampler_steps), self.eta,
                                    fresh=lambda shape: torch.rand(shape, device=x.device, dtype=x.dtype) - 0.5)
        x_hat = self.g_s(y_t, emb)
        x_sampled = self.g_s(y_s, emb_clean)
        mse = (x_hat - x).pow(2).flatten(1).mean(1) * PIXEL_SCALE2
        mse_sampled = (x_sampled - x).pow(2).flatten(1).mean(1) * PIXEL_SCALE2
        loss = mse + mse_sampled
        extra = {}
        if detail_weight > 0:
            detail = (detail_energy_loss(x_hat, x) + detail_energy_loss(x_sampled, x)) * PIXEL_SCALE2
            loss = loss + detail_weight * detail
            extra["detail"] = detail
        return {"loss": self.lmbda(q) * loss, "mse": mse, "mse_sampled": mse_sampled, "q": q, **extra,
                "psnr": 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10)),
                "psnr_sampled": 10 * torch.log10(255.0**2 / mse_sampled.clamp_min(1e-10)),
                "x_hat": x_hat, "x_sampled": x_sampled, "y_t": y_t}

    # ------------------------------------------------------------------ float64 coding helpers
    def _f64(self):
        if next(self.parameters()).dtype != torch.float64:
            self.double()
        return self

    def _emb(self, q: float) -> torch.Tensor:
        return self.embed(torch.tensor([math.log(q)], dtype=torch.float64))

    @torch.inference_mode()
    def analyse(self, pixels: np.ndarray) -> np.ndarray:
        """y = g_a(x) for uint8 (C, H, W) pixels (H, W multiples of 16); float64 (1, M, H/16, W/16)."""
        from ..schedule import pixel_to_unit

        self._f64()
        x = pixel_to_unit(pixels.astype(np.float64))[None]
        return tiled(lambda t: self.g_a(torch.from_numpy(t)).numpy(), x, self.M, 1.0 / 16, ANALYSIS_TILE, 64)

    @torch.inference_mode()
    def _z_prior_f64(self, emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        zp = self.z_prior(emb).numpy()[0]
        return quantize_to_grid(zp[: self.Nz], MU_GRID_BITS), quantize_to_grid(zp[self.Nz :], LOGS_GRID_BITS)

    @torch.inference_mode()
    def _y_params_f64(self, z_hat: np.ndarray, q: float, hw: tuple[int, int]):
        """(mu, scale index) of every latent element, exactly reproducible from integers z_hat and q."""
        mu, log_sigma = self.hyper_synthesis(torch.from_numpy(z_hat), self._emb(q), hw)
        mu = quantize_to_grid(mu.numpy(), MU_GRID_BITS)
        log_sigma = quantize_to_grid(log_sigma.numpy(), LOGS_GRID_BITS)
        return mu, scale_index(log_sigma - math.log(q))

    def _z_table(self, emb, shape):
        zmu, zlogs = self._z_prior_f64(emb)
        per = shape[2] * shape[3]
        mu_flat = np.repeat(zmu, per)
        ls_flat = np.repeat(zlogs, per)
        return mu_flat, ls_flat

    @torch.inference_mode()
    def encode_latent(self, y: np.ndarray, q: float) -> tuple[list[Section], np.ndarray]:
        """Code latent y at step q; returns (sections, y_hat as the decoder will see it)."""
        self._f64()
        q = self.check_q(q)
        emb = self._emb(q)
        z = self.hyper_analysis(torch.from_numpy(y), emb).numpy()
        z_hat = np.round(z)
        kz = z_hat.reshape(-1).astype(np.int64)
        rz = int(max(1, np.abs(kz).max()))
        if rz > MAX_Z_HALF_WIDTH:
            raise DiffcodecError("hyper-latent out of range (model unsuited to this image)")
        mu_f, ls_f = self._z_table(emb, z_hat.shape)
        payload, ideal = encode_categorical(kz + rz, 2 * rz + 1, lambda sl: logistic_tables(mu_f[sl], ls_f[sl], rz))
        sec_z = Section(KIND_HYPER, 1, struct.pack("<H", rz), payload, symbols_crc(kz), ideal)

        mu, idx = self._y_params_f64(z_hat, q, y.shape[-2:])
        k = np.round((y - mu) / q)
        ry = int(max(1, np.abs(k).max()))
        if ry > MAX_HALF_WIDTH:
            raise DiffcodecError("latent out of range (q too small for this image)")
        k = k.astype(np.int64)
        payload, ideal = encode_gaussian(k, idx, ry)
        sec_y = Section(KIND_LATENT, 2, struct.pack("<H", ry), payload, symbols_crc(k.reshape(-1)), ideal)
        return [sec_z, sec_y], mu + k * q

    @torch.inference_mode()
    def decode_latent_rvgc(self, sections: list[Section], q: float, y_shape: tuple[int, ...]) -> np.ndarray:
        """y_hat from the sections; with only the hyper-latent section, the prior mean (a preview)."""
        self._f64()
        _, M, h, w = y_shape
        emb = self._emb(q)
        if not sections or sections[0].kind != KIND_HYPER:
            raise DecodeError("the file holds no hyper-latent section")
        zs = (1, self.Nz, (h + (-h % 4)) // 4, (w + (-w % 4)) // 4)
        sec = sections[0]
        rz = self._half_width(sec)
        if rz > MAX_Z_HALF_WIDTH:
            raise DecodeError(f"corrupt parameters in section {sec.index}")
        mu_f, ls_f = self._z_table(emb, zs)
        n = int(np.prod(zs))
        sym = decode_categorical(sec.payload, n, 2 * rz + 1, lambda sl: logistic_tables(mu_f[sl], ls_f[sl], rz))
        kz = sym.astype(np.int64) - rz
        if symbols_crc(kz) != sec.symbols_crc:
            raise DecodeError("hyper-latent decoded inconsistently (model or platform mismatch)")
        z_hat = kz.reshape(zs).astype(np.float64)
        mu, idx = self._y_params_f64(z_hat, q, (h, w))
        if len(sections) < 2:
            return mu
        sec = sections[1]
        if sec.kind != KIND_LATENT:
            raise DecodeError("unexpected section kind")
        ry = self._half_width(sec)
        k = decode_gaussian(sec.payload, idx, ry).astype(np.int64)
        if symbols_crc(k) != sec.symbols_crc:
            raise DecodeError("latent decoded inconsistently (model or platform mismatch)")
        return mu + k.reshape(mu.shape) * q

    @staticmethod
    def _half_width(sec: Section) -> int:
        if len(sec.params) != 2:
            raise DecodeError(f"malformed parameters in section {sec.index}")
        (r,) = struct.unpack("<H", sec.params)
        if r < 1:
            raise DecodeError(f"malformed parameters in section {sec.index}")
        return r

    # ------------------------------------------------------------------ reconstruction
    def sampler_walk(self, y: torch.Tensor, q: torch.Tensor, steps: int, eta: float, fresh, snap=None) -> torch.Tensor:
        """Reverse the rate diffusion from level q (per example) to 0 in ``steps`` network evaluations.

        Levels l_i = q (1 - i/steps); at each level the Tweedie estimate y0 = y - l u_hat(y, l) is
        formed and the next state is y0 + l_next (sqrt(1 - eta^2) u_hat + eta u'), u' = ``fresh(shape)``
        uniform noise of the same variance as the quantisation error: eta = 0 is a deterministic
        (DDIM-like) path, eta = 1 replaces the predicted noise by fresh noise (ancestral).  The last
        step returns its Tweedie estimate.  ``snap`` (decoding: rounding to a fixed grid) is applied
        to every network output and state; decoder fine-tuning runs the same walk without it.
        """
        snap = snap or (lambda t: t)
        qv = q.reshape(-1, 1, 1, 1)
        c_fresh, c_keep = float(eta), math.sqrt(max(0.0, 1.0 - float(eta) ** 2))
        for i in range(steps):
            level = qv * (1.0 - i / steps)
            u_hat = snap(self.denoiser_eps(y, level.reshape(-1)))
            y0 = y - level * u_hat
            if i == steps - 1:
                return y0
            y = snap(y0 + qv * (1.0 - (i + 1) / steps) * (c_keep * u_hat + c_fresh * fresh(tuple(y.shape))))
        return y

    @torch.inference_mode()
    def sample_latent(self, y_hat: np.ndarray, q: float, steps: int, eta: float, rng) -> np.ndarray:
        """The decoder's sampler (``sampler_walk``) in float64 from the decoded latent, with the shared
        randomness ``rng``; outputs are rounded to a fixed grid at every step (determinism)."""
        self._f64()
        if steps < 1:
            return y_hat
        y = torch.from_numpy(np.ascontiguousarray(y_hat))
        out = self.sampler_walk(y, torch.tensor([float(q)], dtype=torch.float64), steps, eta,
                                fresh=lambda shape: torch.from_numpy(rng.uniform(shape) - 0.5),
                                snap=lambda t: torch.from_numpy(quantize_to_grid(t.numpy(), EPS_GRID_BITS)))
        return out.numpy()

    @torch.inference_mode()
    def synthesize(self, y: np.ndarray, q_cond: float) -> np.ndarray:
        """uint8 pixels (1, C, H, W) = g_s(y) conditioned on the noise level q_cond."""
        self._f64()
        emb = self._emb(q_cond)
        x = tiled(lambda t: self.g_s(torch.from_numpy(t), emb).numpy(), y, self.in_channels, 16.0,
                  ANALYSIS_TILE // 16, 4)
        return unit_to_pixel(quantize_to_grid(x, EPS_GRID_BITS))

    def sampler_max_q_for(self, pixels: int | None = None) -> float | None:
        """The highest q at which the default decoder samples, for an image of ``pixels`` pixels (None:
        the sampler at every q).  Without a size: the model's ``sampler_max_q``, its smallest-image limit."""
        limits = [max_q for px, max_q in self.sampler_max_q_by_pixels if pixels is not None and pixels >= px]
        return limits[-1] if limits else self.sampler_max_q  # the pairs are sorted by size

    def default_sampler_steps(self, q: float, pixels: int | None = None) -> int:
        """Sampler steps of the default decoder at ``q`` for an image of ``pixels`` pixels: the model's
        ``sampler_steps``, or 0 (the plain synthesis) above its ``sampler_max_q_for(pixels)``, where the
        sampler measured less realistic."""
        limit = self.sampler_max_q_for(pixels)
        return 0 if limit is not None and q > limit else self.sampler_steps

    def reconstruct_rvgc(self, y_hat: np.ndarray, q: float, deterministic: bool = False,
                         sampler_steps: int | None = None, eta: float | None = None, rng=None,
                         pixels: int | None = None) -> np.ndarray:
        """Pixels from a decoded latent: plain g_s (``deterministic``) or sampler + g_s.

        By default the model's ``sampler_steps``, or none above its ``sampler_max_q_for(pixels)``
        (``pixels``: the image's size); an explicit ``sampler_steps`` is always honoured.
        """
        steps = self.default_sampler_steps(q, pixels) if sampler_steps is None else int(sampler_steps)
        if not 0 <= steps <= 16:
            raise DiffcodecError("sampler steps must be in 0..16")
        eta = self.eta if eta is None else float(eta)
        if not 0.0 <= eta <= 1.0:
            raise DiffcodecError("eta must be in [0, 1]")
        if deterministic or steps == 0:
            return self.synthesize(y_hat, q)
        y0 = self.sample_latent(y_hat, q, steps, eta, rng)
        return self.synthesize(y0, self.clean_level)
