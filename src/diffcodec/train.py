"""Training loop shared by every codec model (single process or ``torchrun`` DDP).

Every model's ``forward(x)`` returns a dict whose ``bpd`` entry is a per-example code length in
bits per dimension; the trainer minimises its mean.  Features: Adam with linear warm-up and
cosine decay, gradient clipping, an EMA of the weights (the EMA is what gets exported), periodic
*atomic* checkpoints with ``--resume``, a held-out validation bits/dim, a tqdm progress bar with
the loss in bits/dim, and a ``log.jsonl`` of all metrics.

With ``decoder_only`` the run fine-tunes only the decoder of an ``--init`` model (its
``decoder_parameters()``, on the latents the decoder really receives); ``gan_weight`` > 0 adds an
adversarial loss against a latent-conditioned patch discriminator (adversarial.py) that is
checkpointed with the run, ``detail_weight`` > 0 a detail-energy loss (texture.py);
``decoder_width`` / ``decoder_refine`` first grow the init model's decoder (``RVGC.with_decoder``),
which starts out computing what the old one did.

Distributed: when started by ``torchrun`` (``WORLD_SIZE`` set) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank samples its own crops and only
rank 0 writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .codecs.noise_basis import BASES as NOISE_BASES
from .codecs.noise_basis import NoiseBasis
from .codecs.uqdm import UQDM
from .data import CropSampler, list_images, split_files, validation_batch
from .errors import DiffcodecError
from .imageio import atomic_write
from .models import build_model, load_model, save_model
from .networks import UNetConfig

PRESETS = {
    # name: UNet config kwargs.  "tiny" is for tests (trains in seconds).
    "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, emb_dim=16),
    "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, emb_dim=128),
    "base": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, emb_dim=128),
    # "medium": a 4x4 pixel-unshuffle stem puts the U-Net at 1/4 resolution and below; a small
    # full-resolution head (two 3x3 convs on z, Fourier features, 1x1 layers with a noise-level
    # gain) handles what only full resolution can see, and eps is preconditioned by sigma * z
    # (networks.py says why each part is needed).  Cost per pixel: benchmarks/speed.py.
    "medium": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, emb_dim=128, patch=4,
                   head_channels=32, input_skip=True, fourier_features=(6, 7, 8), head_local=16),
}
DEFAULT_PRESET = {"uqdm": "medium", "diffc": "medium", "rvgc": "small"}


DEFAULT_STEPS = {"uqdm": 4, "diffc": 16}


def default_noise_basis(unet: UNetConfig) -> str:
    """Noise basis of a new uqdm model (codecs/noise_basis.py): opponent colours with a 4x4 DCT when
    the network's pixel-unshuffle stem lets it tell the 16 positions of a DCT block apart (so that its
    scale output can name each frequency), opponent colours alone otherwise."""
    return "opponent-dct4" if unet.patch % 4 == 0 else "opponent"


CODEC_DEFAULTS = {  # batch and crop when not given: what the bundled models were trained with
    "uqdm": {"batch": 32, "crop": 32},
    "diffc": {"batch": 32, "crop": 32},
    "rvgc": {"batch": 8, "crop": 128},
}


@dataclass
class TrainConfig:
    codec: str = "uqdm"
    data: str = ""
    out: str = "run"
    preset: str = ""  # "" = the codec's default (DEFAULT_PRESET)
    num_steps: int = 0  # diffusion steps T of the progressive codec (0 = codec default: uqdm 4, diffc 16)
    train_steps: str = ""  # uqdm: e.g. "6,8,12": each iteration simulates the chain on one of these T's grids
    step_weights: str = ""  # uqdm: e.g. "1,2,2,0.5": each coding step's bits weighted in the loss (UQDM.forward)
    keep_chain: str = ""  # uqdm: "default" or shares like "0.1,0.3,0.8": train on the chain of kept-share files
    keep_chain_uncoded: float = 0.0  # ... adding this weight times the uncoded coordinates' code length (UQDM.forward)
    noise_basis: str = ""  # uqdm: basis of the uniform noise (codecs/noise_basis.py; "" = default / the --init model's)
    c_max: int = 12  # DiffC: chunk size cap of the reverse channel coder, in bits
    iters: int = 10000
    batch: int = 0  # 0 = the codec's default (CODEC_DEFAULTS)
    crop: int = 0  # 0 = the codec's default: rvgc needs crops large enough for its 64x downsampling
    zoom: float = 1.0  # scale augmentation: crops upsampled by up to this factor (data.CropSampler)
    zoom_min: float = 1.0  # ... and shrunk by down to this factor (< 1: more detail per pixel)
    init: str = ""  # fine-tune: start from this model's weights (bundled name or .safetensors), step 0
    decoder_only: bool = False  # fine-tune only the decoder of the --init model (rvgc; coded sections stay the same)
    gan_weight: float = 0.0  # > 0: ... with an adversarial loss (implies decoder_only; adversarial.py)
    detail_weight: float = 0.0  # > 0: ... with a detail-energy loss of this weight (implies decoder_only; texture.py)
    disc_lr: float = 1e-4  # learning rate of the discriminator (adversarial fine-tuning)
    decoder_width: int = 0  # > 0: grow the --init model's g_s to this many hidden channels (rvgc, decoder-only)
    decoder_refine: int = 0  # > 0: ... and give it a full-resolution head of this many channels
    mid_blocks: int = 0  # uqdm/diffc, > 0: ResBlocks at the network's coarsest level (with --init: grown to this)
    lr: float = 2e-4
    warmup: int = 200
    ema: float = 0.999
    clip: float = 1.0
    ckpt_every: int = 200
    val_every: int = 500
    val_batch: int = 64
    threads: int = 0
    seed: int = 0
    device: str = "cpu"
    bf16: bool = True
    resume: bool = False


def _preset(cfg: TrainConfig) -> str:
    return cfg.preset or DEFAULT_PRESET.get(cfg.codec, "small")


def model_config(cfg: TrainConfig) -> dict:
    """Model config for a codec: UQDM's network also predicts a per-pixel log-scale (2C outputs)."""
    preset = _preset(cfg)
    if cfg.codec == "rvgc":
        from .codecs.rvgc import PRESETS as RVGC_PRESETS
        from .codecs.rvgc import RVGC

        if preset not in RVGC_PRESETS:
            raise DiffcodecError(f"rvgc has no preset {preset!r} (choose from {', '.join(RVGC_PRESETS)})")
        return RVGC.preset_config(preset)
    if preset not in PRESETS:
        raise DiffcodecError(f"{cfg.codec} has no preset {preset!r} (choose from {', '.join(PRESETS)})")
    unet = UNetConfig(**PRESETS[preset], out_channels=6 if cfg.codec == "uqdm" else 3)
    if cfg.mid_blocks:
        unet.mid_blocks = cfg.mid_blocks
    out = {"codec": cfg.codec, "unet": unet.to_dict(), "num_steps": cfg.num_steps or DEFAULT_STEPS[cfg.codec]}
    if cfg.codec == "diffc":
        out["c_max"] = cfg.c_max
    if cfg.codec == "uqdm":
        out["noise_basis"] = cfg.noise_basis or default_noise_basis(unet)
    return out


def _check_noise_basis(cfg: TrainConfig) -> None:
    if not cfg.noise_basis:
        return
    if cfg.codec != "uqdm":
        raise DiffcodecError(f"--noise-basis is for uqdm (the basis of its uniform noise), not {cfg.codec}")
    if cfg.noise_basis not in NOISE_BASES:
        raise DiffcodecError(f"--noise-basis must be one of {', '.join(NOISE_BASES)}, not {cfg.noise_basis!r}")


def _atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: a kill (or a crash) at any
    moment leaves either the previous checkpoint or the new one, never a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TEMP_PATTERNS = ("checkpoint.pt*.tmp", "model.safetensors*.tmp", ".log.jsonl.*.tmp")


def _remove_stale_temps(out: Path) -> None:
    """Temp files of writes a killed run left behind (never read: their rename did not happen)."""
    for pattern in TEMP_PATTERNS:
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


def _load_checkpoint(path: Path, device) -> dict:
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ck, dict) or not {"model", "ema", "opt", "step"} <= set(ck):
            raise ValueError("not a diffcodec training checkpoint")
        return ck
    except Exception as e:
        raise DiffcodecError(f"cannot resume from {path}: {e}; move it away to start afresh") from None


def _truncate_log(log_path: Path, step: int) -> None:
    """Keep the log records up to ``step`` (the checkpoint resumed from); drop a line cut by a kill.

    Rewritten atomically, so a kill during the rewrite loses nothing either.
    """
    keep = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write(log_path, "".join(line + "\n" for line in keep).encode())


def _init_weights(cfg: TrainConfig) -> tuple[dict, dict, dict]:
    """(model config, float32 state dict, provenance for the card) of the ``--init`` model.

    Fine-tuning starts a new run (step 0, fresh optimizer and learning-rate schedule) from trained
    weights, with the init model's architecture: ``--preset`` does not apply.  A run's own
    ``model.safetensors`` (float32 EMA weights) loses nothing; a bundled fp16 model starts from
    its rounded weights.
    """
    try:
        src = load_model(cfg.init)
    except DiffcodecError:
        raise
    except Exception as e:  # a foreign or broken file
        raise DiffcodecError(f"cannot initialise from {cfg.init}: {e}") from None
    mcfg = src.config_dict()
    if mcfg.get("codec") != cfg.codec:
        raise DiffcodecError(f"--init model {cfg.init} is a {mcfg.get('codec')} model, not {cfg.codec}")
    if cfg.num_steps and cfg.codec in ("uqdm", "diffc"):
        # another step count: the network is conditioned on gamma, so it carries over to the new grid
        if mcfg.get("scale_offsets") and cfg.codec == "uqdm":
            # the fitted scale offsets keep the grid they were fitted on (interpolated in gamma)
            mcfg["scale_offset_steps"] = int(src.scale_offset.shape[0])
        if mcfg.get("context") and cfg.codec == "uqdm":  # so does the fitted context
            mcfg["context_steps"] = int(src.context_weight.shape[0])
        mcfg["num_steps"] = cfg.num_steps
    state = {k: v.float() for k, v in src.state_dict().items()}
    if cfg.noise_basis and cfg.codec == "uqdm" and cfg.noise_basis != mcfg.get("noise_basis", "rgb"):
        # another noise basis: the denoiser carries over (x, z and eps stay in RGB); its learned
        # scales now belong to the new coordinates and are retrained by the fine-tune
        mcfg["noise_basis"] = cfg.noise_basis
        state.pop("noise_basis_code", None)
        # fitted scale offsets and context belong to the old coordinates: dropped (fit them again)
        for key in ("scale_offsets", "scale_offset_steps", "context", "context_steps"):
            mcfg.pop(key, None)
        for key in ("scale_offset", "context_weight", "context_adapt"):
            state.pop(key, None)
        if cfg.noise_basis != "rgb":
            state["noise_basis_code"] = torch.tensor(NoiseBasis(cfg.noise_basis).code, dtype=torch.int8)
    return mcfg, state, {"model": cfg.init, "model_hash": src.model_hash}


def _with_mid_blocks(cfg: TrainConfig, mcfg: dict, grow: bool) -> dict:
    """The model config with ``--mid-blocks`` applied: an ``--init`` model (``grow``) gets that many blocks at
    its coarsest level (never fewer); any other run (a preset, which already has them, or a resumed run)
    must have them."""
    if not cfg.mid_blocks:
        return mcfg
    if "unet" not in mcfg:
        raise DiffcodecError(f"--mid-blocks is for uqdm and diffc networks, not {cfg.codec}")
    have = int(mcfg["unet"].get("mid_blocks", 2))
    if grow:
        if cfg.mid_blocks < have:
            raise DiffcodecError(f"--init model has {have} blocks at its coarsest level: --mid-blocks can only add "
                                 "blocks")
        return {**mcfg, "unet": {**mcfg["unet"], "mid_blocks": cfg.mid_blocks}}
    if have != cfg.mid_blocks:
        raise DiffcodecError(f"the run being resumed has {have} blocks at its coarsest level; resume with the "
                             "options it was started with")
    return mcfg


def _load_init(model, state: dict) -> None:
    """Load the ``--init`` weights into ``model``: exactly, except for the coarsest-level blocks that
    ``--mid-blocks`` added, which are absent from ``state`` and keep their construction (the identity,
    ``networks.DenoiserUNet``)."""
    trained = {k.split(".")[2] for k in state if k.startswith("net.mid.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [*unexpected, *(k for k in missing if not (k.startswith("net.mid.") and k.split(".")[2] not in trained))]
    if bad:
        raise DiffcodecError(f"--init weights do not fit the model: {bad[:5]}")


def _decoder_only(cfg: TrainConfig) -> bool:
    """Whether the run fine-tunes only a decoder: asked for, or implied by a decoder-only loss term."""
    return cfg.decoder_only or cfg.gan_weight > 0 or cfg.detail_weight > 0


def _grow_decoder(cfg: TrainConfig, model, resumed: bool):
    """The --init model with a wider g_s / a full-resolution head that starts out decoding like it.

    A resumed run already has its grown decoder (the checkpoint's architecture): the options must
    match it, so that they are never silently ignored."""
    if not hasattr(model, "with_decoder"):
        raise DiffcodecError(f"--decoder-width / --decoder-refine are for rvgc models, not {cfg.codec}")
    if not _decoder_only(cfg):
        raise DiffcodecError("--decoder-width / --decoder-refine grow the decoder of a decoder fine-tune: "
                             "add --decoder-only")
    width = cfg.decoder_width or model.N_s
    refine = cfg.decoder_refine or model.refine
    if resumed:
        if (width, refine) != (model.N_s, model.refine):
            raise DiffcodecError(f"the run being resumed has a decoder of width {model.N_s} and head {model.refine}; "
                                 "resume with the options it was started with")
        return model
    if not cfg.init:
        raise DiffcodecError("--decoder-width / --decoder-refine grow the decoder of a trained model: add --init")
    if width < model.N_s or refine < model.refine:
        raise DiffcodecError(f"--init model's decoder has width {model.N_s} and head {model.refine}; "
                             "it can only grow")
    return model.with_decoder(width, refine)


def _decoder_setup(cfg: TrainConfig, model, resuming: bool, device):
    """Freeze all but the decoder; with a GAN weight, build the discriminator and its optimizer."""
    from .adversarial import PatchDiscriminator

    if not hasattr(model, "decoder_parameters"):
        raise DiffcodecError(f"decoder fine-tuning (--decoder-only, --gan-weight) is for rvgc models, not {cfg.codec}")
    if not (cfg.init or resuming):
        raise DiffcodecError("decoder fine-tuning (--decoder-only, --gan-weight) needs a trained model to start "
                             "from (--init)")
    params = model.decoder_parameters()
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if cfg.gan_weight <= 0:
        return params, None, None
    disc = PatchDiscriminator(model.in_channels, model.M).to(device)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
    return params, disc, opt_d


def _adversarial_step(cfg: TrainConfig, res: dict, x: torch.Tensor, dnet, disc, opt_d, lr_scale: float) -> dict:
    """Given the decoder pass ``res``: one discriminator update, then the decoder's loss (distortion +
    gan_weight * adversarial) in ``res["loss"]`` and the GAN terms for the log.

    Both decoders of the codec (plain, and after the sampler) are judged, each fake paired with the
    latent the decoder received.  The discriminator follows the decoder's warm-up and decay.
    """
    from .adversarial import disc_loss, gen_loss

    B = x.shape[0]
    fake = torch.cat([res["x_hat"], res["x_sampled"]])
    cond = torch.cat([res["y_t"], res["y_t"]])
    d_loss, d_real, d_fake = disc_loss(dnet, torch.cat([x, x]), fake, cond)
    for g in opt_d.param_groups:
        g["lr"] = cfg.disc_lr * lr_scale
    opt_d.zero_grad(set_to_none=True)
    d_loss.mean().backward()
    dnorm = torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.clip)
    if torch.isfinite(dnorm):
        opt_d.step()
    # the decoder's step sees the updated discriminator, unwrapped: its weights get no gradient here
    disc.requires_grad_(False)  # the graph records no discriminator weight gradients (not needed)
    g_adv = gen_loss(disc, fake, cond)
    disc.requires_grad_(True)
    g_adv = g_adv[:B] + g_adv[B:]
    return {**res, "loss": res["loss"] + cfg.gan_weight * g_adv, "g_adv": g_adv.detach(),
            "d_loss": d_loss.detach(), "d_real": d_real, "d_fake": d_fake}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.iters - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate_bpd(model, batch: torch.Tensor, chunk: int = 16, keep: tuple[int, ...] | None = None) -> float:
    """Exact (all steps) code length in bits/dim on a fixed batch, with a fixed noise seed; ``keep``
    (uqdm): of files with these kept shares (255ths), on their chain.

    For rvgc, whose ``bpd`` entry is its rate-distortion loss, this is that loss (q drawn from the
    fixed seed)."""
    was = model.training
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        kw = {} if keep is None else {"keep": keep}
        vals = [model(batch[i : i + chunk], all_steps=True, **kw)["bpd"] for i in range(0, len(batch), chunk)]
    finally:
        torch.random.set_rng_state(state)
        model.train(was)
    return float(torch.cat(vals).mean())


def parse_train_steps(cfg: TrainConfig) -> list[int]:
    """The step counts of ``--train-steps`` (uqdm only; empty: the model's own T)."""
    if not cfg.train_steps:
        return []
    if cfg.codec != "uqdm":
        raise DiffcodecError("--train-steps is for uqdm (diffc's continuous-time loss has no grid)")
    try:
        out = sorted({int(v) for v in cfg.train_steps.split(",") if v.strip()})
    except ValueError:
        raise DiffcodecError(f"--train-steps takes step counts like 6,8,12, not {cfg.train_steps!r}") from None
    if not out or not all(1 <= v <= 255 for v in out):
        raise DiffcodecError(f"--train-steps: step counts must be in 1..255, got {cfg.train_steps!r}")
    return out


def parse_step_weights(cfg: TrainConfig, num_steps: int) -> torch.Tensor | None:
    """The per-step loss weights of ``--step-weights`` (uqdm only; None: the plain code length)."""
    if not cfg.step_weights:
        return None
    if cfg.codec != "uqdm":
        raise DiffcodecError("--step-weights is for uqdm (its loss is a sum over coding steps)")
    if cfg.train_steps:
        raise DiffcodecError("--step-weights weights the model's own steps; it does not go with --train-steps")
    try:
        w = torch.tensor([float(v) for v in cfg.step_weights.split(",")])
        UQDM.chain_step_weights(w, num_steps)  # the checks forward applies, before the run starts
    except ValueError as e:
        raise DiffcodecError(f"--step-weights {cfg.step_weights!r}: {e}") from None
    return w


def parse_keep_chain(cfg: TrainConfig, model) -> tuple[int, ...] | None:
    """The kept shares (255ths, as a file's header holds them) of ``--keep-chain`` (uqdm only; None: the
    plain chain): ``default`` is the model's default shares (:meth:`UQDM.default_keep`)."""
    if not cfg.keep_chain:
        if cfg.keep_chain_uncoded:
            raise DiffcodecError("--keep-chain-uncoded weights a term of --keep-chain's loss; give --keep-chain")
        return None
    if not 0.0 <= cfg.keep_chain_uncoded <= 1e3:
        raise DiffcodecError(f"--keep-chain-uncoded takes a weight >= 0, not {cfg.keep_chain_uncoded}")
    if cfg.codec != "uqdm":
        raise DiffcodecError("--keep-chain is for uqdm (kept coordinates are a uqdm file option)")
    if cfg.train_steps:
        raise DiffcodecError("--keep-chain trains the model's own steps; it does not go with --train-steps")
    from .api import _keep_shares, parse_keep

    try:
        return _keep_shares(model, parse_keep(cfg.keep_chain))
    except ValueError as e:
        raise DiffcodecError(f"--keep-chain: {e}") from None


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Run (or resume) training; returns final metrics.  Writes ``out/model.safetensors``."""
    cfg = replace(cfg, preset=_preset(cfg))
    grids = parse_train_steps(cfg)
    _check_noise_basis(cfg)
    defaults = CODEC_DEFAULTS.get(cfg.codec, CODEC_DEFAULTS["uqdm"])
    cfg = replace(cfg, batch=cfg.batch or defaults["batch"], crop=cfg.crop or defaults["crop"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    device = torch.device(cfg.device)
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
    ckpt_path = out / "checkpoint.pt"

    train_files, _ = split_files(list_images(cfg.data))
    sampler = CropSampler(train_files, cfg.crop, seed=cfg.seed * 1000 + rank, zoom=cfg.zoom, zoom_min=cfg.zoom_min)
    val_batch = validation_batch(cfg.data, cfg.crop, cfg.val_batch)

    torch.manual_seed(cfg.seed * 1000 + rank)
    ck = _load_checkpoint(ckpt_path, device) if cfg.resume and ckpt_path.exists() else None
    init_state = None
    init_from = ck.get("init") if ck is not None else None
    if ck is not None and "model_config" in ck:
        mcfg = ck["model_config"]  # the architecture the run was started with (e.g. from --init)
    elif cfg.init and ck is None:  # a resumed run takes its weights from the checkpoint
        mcfg, init_state, init_from = _init_weights(cfg)
    else:
        mcfg = model_config(cfg)
    if cfg.noise_basis and cfg.codec == "uqdm" and mcfg.get("noise_basis", "rgb") != cfg.noise_basis:
        raise DiffcodecError(f"the run being resumed uses the noise basis {mcfg.get('noise_basis', 'rgb')!r}; "
                             "resume with the options it was started with")
    mcfg = _with_mid_blocks(cfg, mcfg, grow=init_state is not None)
    model = build_model(mcfg)
    if init_state is not None:
        _load_init(model, init_state)
    if cfg.decoder_width or cfg.decoder_refine:
        model = _grow_decoder(cfg, model, resumed=ck is not None)
        mcfg = model.config_dict()
    step_weights = parse_step_weights(cfg, getattr(model, "num_steps", 0))
    keep = parse_keep_chain(cfg, model)
    model = model.to(device)
    model.autocast_bf16 = cfg.bf16 and device.type == "cpu"
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    disc = opt_d = None
    decoder_only = _decoder_only(cfg)
    if decoder_only:
        params, disc, opt_d = _decoder_setup(cfg, model, ck is not None, device)
    else:
        params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    elapsed = 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck.get("elapsed", 0.0)
        if disc is not None:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["opt_disc"])
        sampler.rng = np.random.default_rng(ck["sampler_seed"] + step)
        torch.manual_seed(ck["sampler_seed"] + step)
    elif cfg.resume and main:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
        dnet = DistributedDataParallel(disc) if disc is not None else None
    else:
        dnet = disc

    def save(tag_metrics: dict) -> None:
        card = {"train": asdict(cfg), "step": step, "wallclock_s": round(elapsed, 1), **tag_metrics}
        if init_from:
            card["init"] = init_from
        _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "step": step, "elapsed": elapsed, "config": asdict(cfg), "model_config": mcfg,
                            "init": init_from, "sampler_seed": cfg.seed * 1000 + rank,
                            **({"disc": disc.state_dict(), "opt_disc": opt_d.state_dict()} if disc else {})},
                           ckpt_path)
        save_model(ema, out / "model.safetensors", card=card)

    log_path = out / "log.jsonl"
    if main and log_path.exists():
        # drop records written after the checkpoint we resumed from (or all, when starting afresh)
        _truncate_log(log_path, step)
    log = open(log_path, "a") if main else None
    bar = tqdm(total=cfg.iters, initial=step, disable=quiet or not main, dynamic_ncols=True, unit="it")
    metrics: dict = {}
    run_bpd = None
    t_last = time.time()
    while step < cfg.iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = sampler.batch(cfg.batch).to(device)
        if decoder_only:
            res = net(x, decoder=True, detail_weight=cfg.detail_weight)
            if disc is not None:
                res = _adversarial_step(cfg, res, x, dnet, disc, opt_d, lr_at(step, cfg) / cfg.lr)
            res = {k: v for k, v in res.items() if v.dim() <= 1}  # per-example terms (not the images)
            res["bpd"] = res["loss"]
        elif grids:
            # the same draw on every rank (a function of the step only), so DDP ranks run one graph
            res = net(x, num_steps=grids[int(np.random.default_rng(cfg.seed * 1_000_003 + step).integers(len(grids)))])
        elif step_weights is not None or keep is not None:
            res = net(x, step_weights=step_weights, keep=keep, uncoded_weight=cfg.keep_chain_uncoded)
        else:
            res = net(x)
        loss = res.get("loss", res["bpd"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        if torch.isfinite(gnorm):
            opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        lv = float(loss.detach())
        run_bpd = lv if run_bpd is None else 0.98 * run_bpd + 0.02 * lv
        bar.update(1)
        if hasattr(model, "schedule"):
            shown = "bpd" if step_weights is None else "loss"  # a weighted loss is not a code length
            bar.set_postfix(**{shown: f"{run_bpd:.3f}"}, gmin=f"{float(model.schedule.gamma_min.detach()):.2f}")
        elif "bpp" in res:
            bar.set_postfix(loss=f"{run_bpd:.3f}", bpp=f"{float(res['bpp'].detach().mean()):.3f}")
        else:  # decoder fine-tuning: the rate is fixed
            bar.set_postfix(loss=f"{run_bpd:.3f}", psnr=f"{float(res['psnr'].detach().mean()):.2f}",
                            **({"d_loss": f"{float(res['d_loss'].mean()):.3f}"} if "d_loss" in res else {}))
        if main:
            bpd_now = float(res["bpd"].detach().mean())  # the code length, also when the loss is weighted
            rec = {"step": step, "bpd": bpd_now, **{k: float(v.detach().mean()) for k, v in res.items() if k != "bpd"},
                   "lr": lr_at(step - 1, cfg), "grad_norm": float(gnorm), "elapsed": round(elapsed, 1)}
            if step % cfg.val_every == 0 or step == cfg.iters:
                rec["val_bpd"] = evaluate_bpd(ema, val_batch.to(device), keep=keep)
                metrics["val_bpd"] = rec["val_bpd"]
                bar.write(f"step {step}: val bpd {rec['val_bpd']:.4f} (train ~{run_bpd:.4f})")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.iters:
                save({"val_bpd": metrics.get("val_bpd"), "train_bpd": run_bpd})
    bar.close()
    if main:
        if "val_bpd" not in metrics:
            metrics["val_bpd"] = evaluate_bpd(ema, val_batch.to(device), keep=keep)
        save({"val_bpd": metrics["val_bpd"], "train_bpd": run_bpd})
        log.close()
    if distributed:
        import torch.distributed as dist

        # every rank waits here until rank 0 has validated and saved: a rank that tears its gloo pairs down
        # while a peer still holds them open can be aborted by gloo (seen once in CI: rank 1, SIGABRT)
        del net, dnet
        dist.barrier()
        dist.destroy_process_group()
    metrics.update(step=step, train_bpd=run_bpd, elapsed=elapsed)
    return metrics
