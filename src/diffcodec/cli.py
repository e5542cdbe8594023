"""``diffcodec`` command line: a thin layer over :mod:`diffcodec.api`.

Every error a user can cause prints one line ``diffcodec: error: ...`` and exits with status 1
(2 for bad usage, from argparse); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import __version__
from .errors import DiffcodecError


def _progress(total: int, desc: str, quiet: bool):
    if quiet or total <= 0:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)
    return bar, bar.update


def _read_input(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise DiffcodecError(f"{path}: no such file")
    return p.read_bytes()


def _outputs(inputs: list[str], output: str | None, suffix: str, beside: str, force: bool) -> list[str]:
    """Output paths for ``inputs``, checked before any work: ``-o`` a file (one input), or a directory (several
    inputs, or an existing directory; created if missing) holding ``<stem><suffix>`` each; without ``-o`` each
    output lies beside its input as ``<stem><beside>``.  Refused: two inputs that would write the same output,
    an output onto any input, and (without ``force``) an existing file."""
    from .imageio import check_output

    many = len(inputs) > 1
    if output is not None and (many or Path(output).is_dir()):
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise DiffcodecError(f"{output}: with several inputs -o names a directory, and this is a file")
        outs = [str(folder / (Path(i).stem + suffix)) for i in inputs]
    elif output is not None:
        outs = [output]
    else:
        outs = [str(Path(i).with_suffix(beside)) for i in inputs]
    seen: dict[str, str] = {}
    for i, o in zip(inputs, outs):
        key = os.path.normcase(os.path.abspath(o))
        if key in seen:
            raise DiffcodecError(f"{seen[key]} and {i} would both be written to {o}")
        seen[key] = i
    for o in outs:
        check_output(o, inputs=tuple(inputs), overwrite=force)
    if many and output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
    return outs


def _each(a, outs: list[str], one) -> int:
    """Run ``one(input, output)`` over the inputs.  A single input raises its error as before; with several,
    an input that fails prints its one-line error and the others go on (exit status 1 if any failed)."""
    if len(a.input) == 1:
        return one(a.input[0], outs[0])
    failed = 0
    for src, out in zip(a.input, outs):
        try:
            one(src, out)
        except (DiffcodecError, ValueError, OSError) as e:
            failed += 1
            print(f"diffcodec: error: {src}: {e}" if src not in str(e) else f"diffcodec: error: {e}",
                  file=sys.stderr)
    if failed and not getattr(a, "json", False):
        print(f"diffcodec: {failed} of {len(a.input)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_compress(a) -> int:
    from .api import get_model

    outs = _outputs(a.input, a.output, ".dfc", ".dfc", a.force)
    model = get_model(a.model, a.codec or "uqdm")
    return _each(a, outs, lambda src, out: _compress_one(a, src, out, model))


def _compress_one(a, src: str, out: str, model) -> int:
    from .api import compress
    from .imageio import atomic_write

    total = model.num_steps if (a.lossless or a.bpp is not None or model.codec_id == "rvgc") else (a.steps or 0)
    bar, cb = _progress(total, "encoding", a.quiet or a.json)
    try:
        res = compress(src, model=model, codec=a.codec, steps=a.steps, bpp=a.bpp, lossless=a.lossless,
                       seed=a.seed, alpha="drop" if a.drop_alpha else "error", progress=cb, c_max=a.c_max,
                       pad=a.pad, q=a.q_step, parts=a.parts, box_prior=False if a.no_box_prior else None,
                       keep=a.keep)
    finally:
        if bar:
            bar.close()
    atomic_write(out, res.data, inputs=tuple(a.input), overwrite=a.force)
    if a.json:
        print(json.dumps({"input": src, "output": out, **res.summary()}), flush=True)
    elif not a.quiet:
        kind = f"q {res.q:.4g}" if res.q is not None else "lossless" if res.lossless else f"{res.steps} step(s)"
        tail = 0  # the parts of a step the file ends inside (uqdm step parts)
        for sec in reversed(res.sections):
            if sec["kind"] != "part":
                break
            tail += 1
        if tail:
            kind += f" and {tail} part(s) of step {res.steps + 1}"
        print(f"{src} -> {out}: {res.file_bytes} bytes, {res.bpp:.4f} bpp, {kind}, "
              f"model {res.model} (ideal {res.ideal_bits_total / 8:.0f} bytes)", flush=True)
    return 0


def cmd_decompress(a) -> int:
    # default name: never photo.png next to photo.dfc, which is likely the user's original
    outs = _outputs(a.input, a.output, ".png", ".decoded.png", a.force)
    return _each(a, outs, lambda src, out: _decompress_one(a, src, out))


def _decompress_one(a, src: str, out: str) -> int:
    from .api import decompress, info
    from .imageio import write_image

    data = _read_input(src)
    meta = info(data, max_pixels=a.max_pixels)
    img = decompress(data, model=a.model, steps=a.steps, method=a.method, nfe=a.nfe, max_pixels=a.max_pixels,
                     deterministic=a.deterministic, sampler_steps=a.sampler_steps, eta=a.eta,
                     channel_aware=a.channel_aware)
    write_image(out, img, inputs=tuple(a.input), overwrite=a.force)
    if not meta["complete"]:
        used = a.steps or meta["sections_in_file"]
        print(f"diffcodec: note: {src} is truncated: decoded {used} of {meta['sections_encoded']} sections",
              file=sys.stderr)
    if not a.quiet:
        if meta["codec"] != "rvgc":
            how = f"method {a.method}"
        elif a.deterministic or a.sampler_steps == 0:
            how = "plain synthesis"
        else:  # the model's default may be the plain synthesis at this q (its sampler_max_q)
            how = f"sampler, {a.sampler_steps} steps" if a.sampler_steps is not None else "the model's default decoder"
        print(f"{src} -> {out}: {img.shape[1]}x{img.shape[0]}, {how}", flush=True)
    return 0


def cmd_info(a) -> int:
    from .api import info

    d = info(_read_input(a.input), max_pixels=a.max_pixels)
    if a.json:
        print(json.dumps(d))
        return 0
    print(f"{a.input}: {d['codec']} .dfc v{d['format_version']}, {d['width']}x{d['height']}x{d['channels']}, "
          f"model {d['model']} ({d['model_hash']}), {d['file_bytes']} bytes, {d['bpp']:.4f} bpp")
    state = "complete" if d["complete"] else f"partial: {d['sections_in_file']} of {d['sections_encoded']} sections"
    if "q" in d:
        print(f"  quantisation step q = {d['q']:g}; {state}")
    else:
        prior = {True: "; steps coded under box priors", False: "; whole step priors (the format before box priors)"}
        print(f"  {d['total_steps']} diffusion steps in the model; {state}{prior.get(d.get('box_prior'), '')}")
        if d.get("keep"):
            shares = " / ".join(f"{v / 255:.0%}" for v in d["keep"])
            print(f"  coordinates each step codes (steps 1-{len(d['keep'])}, the rest drawn from its prior): {shares}")
    for s in d["sections"]:
        label = f"step {s['step']}" if s["kind"] == "step" else s["kind"]
        print(f"  section {s['index']:>2} {label:<12} offset {s['offset']:>8}  {s['bytes']:>8} bytes")
    return 0


def cmd_models(a) -> int:
    from .api import list_models

    ms = list_models()
    if a.json:
        print(json.dumps(ms))
        return 0
    if not ms:
        print("no models (none bundled, none on $DIFFCODEC_MODEL_PATH)")
    for m in ms:
        if "error" in m:
            print(f"! {m['name']:<14} {m['error']}")
            continue
        star = "*" if m.get("default") else ("+" if not m.get("bundled", True) else " ")
        knob = f"q={m['q_range'][0]:g}..{m['q_range'][1]:g}" if "q_range" in m else f"steps={m.get('steps')}"
        if "noise_basis" in m:
            knob += f" basis={m['noise_basis']}"
            if "final_basis" in m:
                knob += f" last-step={m['final_basis']}"
        print(f"{star} {m['name']:<14} codec={m.get('codec')} {knob} "
              f"size={m.get('file_bytes', 0) / 1e6:.2f} MB  {m.get('summary', '')}")
    if ms:
        print("(* default; + found on $DIFFCODEC_MODEL_PATH, not bundled)")
    return 0


def cmd_train(a) -> int:
    from .train import TrainConfig, train

    kw = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None}
    if not Path(a.data).is_dir():
        raise DiffcodecError(f"data folder not found: {a.data}")
    metrics = train(TrainConfig(**kw), quiet=a.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(model=a.model, image=a.image, out_dir=a.out, methods=tuple(a.methods.split(",")))
    return 0


def _keep_arg(text: str) -> float | list[float] | None:
    """``--keep``: one fraction, a comma list of them (one per step but the last), or ``default``."""
    from .api import parse_keep

    try:
        return parse_keep(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _csv_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _eval_methods(spec: list[str], codec: str) -> list[str] | None:
    """Methods for one codec from ``--methods``: unprefixed ones that the codec has, plus ``codec:method``."""
    from .diffusion import RECONSTRUCTION_METHODS
    from .evaluate import QSweepAdapter

    valid = QSweepAdapter.METHODS if codec == "rvgc" else RECONSTRUCTION_METHODS
    out = [m for m in spec if ":" not in m and m in valid]
    out += [m.split(":", 1)[1] for m in spec if m.startswith(f"{codec}:")]
    return list(dict.fromkeys(out)) or None  # None: the codec's default


def cmd_eval(a) -> int:
    from .api import get_model
    from .baselines import select_baselines
    from .diffusion import RECONSTRUCTION_METHODS
    from .evaluate import BaselineAdapter, QSweepAdapter, load_images, make_adapter, run_eval

    codecs, models, methods = _csv_list(a.codec), _csv_list(a.model), _csv_list(a.methods)
    if models and not codecs:
        codecs = [get_model(m).codec_id for m in models]
    if models and len(models) != len(codecs):
        raise DiffcodecError("give one --model per --codec (comma lists of equal length)")
    known = set(RECONSTRUCTION_METHODS) | set(QSweepAdapter.METHODS)
    for m in methods:
        c, _, name = m.rpartition(":")
        if name not in known or (c and c not in codecs):
            raise DiffcodecError(f"--methods: {m!r} is not a method of the codecs evaluated ({', '.join(codecs)})")
    names = [] if a.baselines.lower() in ("", "none") else None if a.baselines.lower() == "all" else \
        _csv_list(a.baselines)
    try:
        chosen, skipped = select_baselines(names) if names != [] else ({}, {})
    except KeyError as e:
        raise DiffcodecError(str(e.args[0])) from None
    for name, reason in skipped.items():
        print(f"diffcodec: note: skipping baseline {name}: {reason}", file=sys.stderr)
    if not codecs and not chosen:
        raise DiffcodecError("nothing to evaluate: give --codec and/or --baselines")
    try:  # "1-12,14": ranges and single steps
        steps = [k for part in _csv_list(a.steps) for k in range(int(part.split("-")[0]),
                                                                 int(part.split("-")[-1]) + 1)] or None
    except ValueError:
        raise DiffcodecError(f"--steps: expected steps or ranges like 1-12,14, got {a.steps!r}") from None
    try:
        targets = [float(v) for v in _csv_list(a.bpp)] or None
    except ValueError:
        raise DiffcodecError(f"--bpp: expected a comma list of rates, got {a.bpp!r}") from None
    adapters = [make_adapter(c, models[i] if models else None, _eval_methods(methods, c), nfe=a.nfe, steps=steps,
                             channel_aware=a.channel_aware, parts=_csv_list(a.parts) or None, keep=a.keep,
                             sampler_steps=a.sampler_steps, num_q=a.num_q, bpp=targets) for i, c in enumerate(codecs)]
    adapters += [BaselineAdapter(n) for n in chosen]
    images = load_images(a.images, scale=a.downscale, limit=a.limit, pattern=a.pattern)
    log = None if a.quiet else print
    if log:
        sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images.values()})
        log(f"{len(images)} images from {a.images} (downscale {a.downscale}: {', '.join(sizes)})")
    report = run_eval(images, adapters, a.out, workers=a.workers, swd=not a.no_swd, bd_method=a.bd_method,
                      swd_max_bpp=a.swd_max_bpp, title=a.title, progress=not a.quiet, log=log)
    if log:
        tables = (", bd.txt" if report["table"] else "") + (", swd_rate.txt" if report["swd_rate"] else "")
        log(f"\nwrote {len(report['curves'])} curve JSONs, per_image.csv, curves.txt{tables} and plots to {a.out}/ "
            f"({report['points'] - report['points_cached']} points computed, {report['points_cached']} reused)")
    return 0


_PLOT_METRICS = {"psnr": "psnr-rgb", "ms-ssim": "ms-ssim-db", "ms-ssim-rgb": "ms-ssim-rgb", "swd": "swd",
                 "lpips": "lpips"}


def cmd_plot(a) -> int:
    from .evaluate import load_results, plot_rd

    results = []
    for path in a.results:
        try:
            results.append(load_results(path))
        except ValueError as e:  # e.g. a bd.json lying beside the curves: results/*.json
            print(f"diffcodec: note: skipping {path}: {e}", file=sys.stderr)
    if not results:
        raise DiffcodecError("no result JSON to plot")
    out = plot_rd(results, _PLOT_METRICS[a.metric], a.output, title=a.title, max_bpp=a.max_bpp)
    print(f"wrote {out} ({len(results)} curves, {a.metric})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffcodec", description="Image compression with diffusion models.")
    p.add_argument("--version", action="version", version=f"diffcodec {__version__}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="image(s) -> .dfc")
    c.add_argument("input", nargs="+", help="image file(s); several share one loaded model")
    c.add_argument("-o", "--output", help="output file, or a directory for <stem>.dfc files (several inputs: a "
                   "directory, created if missing; default: beside each input)")
    c.add_argument("--codec", choices=["uqdm", "diffc", "rvgc"], help="codec of the default model (default: uqdm, "
                   "or the codec of --model)")
    c.add_argument("--model", help="bundled model name or .safetensors path (default: the codec's default)")
    q = c.add_mutually_exclusive_group()
    q.add_argument("--steps", type=int, help="diffusion steps to send (1..T)")
    q.add_argument("--bpp", type=float, help="best quality whose file fits this many bits/pixel (uqdm: the file "
                   "ends with one step coding the largest share of its coordinates that fits, or with --parts the "
                   "longest prefix of steps and parts; diffc: largest step count; rvgc: smallest q)")
    q.add_argument("--lossless", action="store_true", help="all steps plus the exact final section")
    c.add_argument("--q", dest="q_step", type=float, help="rvgc: quantisation step (the rate knob; larger = "
                   "fewer bits), any value in the model's range")
    c.add_argument("--seed", type=int, default=0, help="shared-randomness seed stored in the file")
    c.add_argument("--c-max", dest="c_max", type=int, help="diffc: bits per reverse-channel-coding chunk "
                   "(8..16; larger = slower, closer to an exact sample)")
    c.add_argument("--pad", type=float, help="diffc: bits of slack between a chunk's KL and c_max (default 2; "
                   "benchmarks/diffc_pad.py measures the trade-off)")
    c.add_argument("--parts", help="uqdm: write each step in parts, ending after these fractions of its "
                   "coordinates (largest prior scale first), e.g. 0.05,0.2,0.35: a file cut after a part decodes "
                   "to the step so far (default with --bpp: 0.5, so the target is met more closely; none: "
                   "whole steps)")
    c.add_argument("--keep", type=_keep_arg, help="uqdm: every step but the last two codes only this fraction of "
                   "its coordinates (largest prior scale first) and draws the rest from its prior: fewer bits for "
                   "little loss (README, UQDM kept coordinates); or one fraction per step but the last, e.g. "
                   "0.1,0.3,0.8; 1: every coordinate (the files before kept coordinates were the default); "
                   "default: the model's shares (info shows them)")
    c.add_argument("--no-box-prior", dest="no_box_prior", action="store_true",
                   help="uqdm: code each step under its whole prior, not restricted to the earlier steps' box: "
                   "a bigger file in the format diffcodec wrote before 2026-12-07, which its older versions read")
    c.add_argument("--drop-alpha", action="store_true", help="discard an alpha channel instead of refusing")
    c.add_argument("--json", action="store_true", help="print one JSON object per file (one line each) with sizes "
                   "and ideal bits")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help=".dfc (complete or truncated) -> image(s)")
    d.add_argument("input", nargs="+", help=".dfc file(s)")
    d.add_argument("-o", "--output", help="output image, or a directory for <stem>.png files (several inputs: a "
                   "directory, created if missing; default: <stem>.decoded.png beside each input)")
    d.add_argument("--model", help="model to decode with (default: the one named in the file)")
    d.add_argument("--steps", type=int, help="decode only the first K step sections")
    d.add_argument("--method", default="denoise", choices=["denoise", "ancestral", "flow"])
    d.add_argument("--nfe", type=int, help="network evaluations for ancestral/flow")
    d.add_argument("--no-channel-aware", dest="channel_aware", action="store_false", help="reconstruct "
                   "from the received latent as it is: diffc without undoing the channel coder's shortfall, uqdm "
                   "without the box its last step puts the image in (x_hat of the latent)")
    d.add_argument("--sampler-steps", dest="sampler_steps", type=int, help="rvgc: steps of the latent sampler "
                   "(default: the model's, by q and image size; see its card)")
    d.add_argument("--eta", type=float, help="rvgc: randomness of the sampler in [0, 1] (default: the model's)")
    d.add_argument("--deterministic", action="store_true", help="rvgc: plain synthesis of the decoded latent")
    d.add_argument("--force", action="store_true", help="overwrite an existing output file")
    d.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse files declaring a larger image "
                   "(default: $DIFFCODEC_MAX_PIXELS or 25000000)")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="describe a .dfc file")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")
    i.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse files declaring a larger image "
                   "(default: $DIFFCODEC_MAX_PIXELS or 25000000)")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the models: bundled, then those on $DIFFCODEC_MODEL_PATH")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a model on a folder of images (torchrun-ready)")
    t.add_argument("--codec", default="uqdm", choices=["uqdm", "diffc", "rvgc"])
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", choices=["tiny", "small", "medium", "base"],
                   help="network size (default: uqdm/diffc medium, rvgc small; rvgc has no medium)")
    t.add_argument("--num-steps", dest="num_steps", type=int, help="diffusion steps T (uqdm 4, diffc 16); with "
                   "--init: fine-tune the model to this step count")
    t.add_argument("--train-steps", dest="train_steps", help="uqdm: train on the grids of several step counts, "
                   "e.g. 6,8,12 (one drawn per iteration), so that one network serves each of them")
    t.add_argument("--step-weights", dest="step_weights", help="uqdm: weight each coding step's bits in the loss, "
                   "one number per step in coding order (the last also weights the lossless term), e.g. "
                   "1,2,2,0.5 to spend the network on the rates where files are cut; validation stays the code length")
    t.add_argument("--keep-chain", dest="keep_chain", help="uqdm: train on the chain of files that code only a "
                   "share of their steps' coordinates (README, UQDM kept coordinates): 'default' (the model's default "
                   "shares, what compress writes) or one fraction per step but the last, e.g. 0.1,0.3,0.8; "
                   "validation is then those files' code length")
    t.add_argument("--keep-chain-uncoded", dest="keep_chain_uncoded", type=float, help="uqdm, with --keep-chain: "
                   "add this weight times the code length of the coordinates the kept steps do not code (their "
                   "posterior samples given the chain), so that the prior keeps predicting x there (what the "
                   "reconstruction after a kept step shows); default 0")
    t.add_argument("--noise-basis", dest="noise_basis", choices=["rgb", "opponent", "opponent-dct4"],
                   help="uqdm: axes of the uniform noise and of the factorised prior: rgb (the paper's), "
                   "opponent (luminance + two colour differences) or opponent-dct4 (and a 4x4 DCT of each; "
                   "the default of medium networks); with --init: convert the model to it")
    t.add_argument("--c-max", dest="c_max", type=int, help="diffc: reverse channel coding chunk cap (bits)")
    t.add_argument("--iters", type=int)
    t.add_argument("--batch", type=int,
                   help="crops per step and process (default: uqdm/diffc 32, rvgc 8)")
    t.add_argument("--crop", type=int,
                   help="crop size in pixels (default: uqdm/diffc 32, rvgc 128)")
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--ema", type=float)
    t.add_argument("--zoom", type=float, help="scale augmentation: each crop is cut smaller and upsampled by a "
                   "factor log-uniform in [ZOOM_MIN, ZOOM] (smoother, full-size-like content; default 1 = off)")
    t.add_argument("--zoom-min", dest="zoom_min", type=float, help="scale augmentation the other way: factors "
                   "below 1 cut larger crops and shrink them (antialiased; more detail per pixel, like small "
                   "images; default 1 = off)")
    t.add_argument("--init", help="fine-tune: start a new run (step 0, fresh optimizer) from this model's weights "
                   "and architecture (bundled name or .safetensors, e.g. a run's model.safetensors)")
    t.add_argument("--decoder-only", dest="decoder_only", action="store_true", default=None,
                   help="rvgc: fine-tune only the decoder (g_s) of an --init model, on the latents it really "
                   "receives; it codes images into the same sections, only reconstructions change")
    t.add_argument("--gan-weight", dest="gan_weight", type=float,
                   help="rvgc: decoder fine-tuning (implies --decoder-only) with an adversarial loss of "
                   "this weight beside the MSE")
    t.add_argument("--detail-weight", dest="detail_weight", type=float,
                   help="rvgc: decoder fine-tuning (implies --decoder-only) with a detail-energy loss of this "
                   "weight (relative to the MSE): fine texture of the right strength (texture.py)")
    t.add_argument("--disc-lr", dest="disc_lr", type=float, help="discriminator learning rate (default 1e-4)")
    t.add_argument("--decoder-width", dest="decoder_width", type=int,
                   help="rvgc decoder fine-tuning: first widen the --init model's g_s to this many hidden "
                   "channels (starts out decoding like it; the encoder and files stay the same)")
    t.add_argument("--decoder-refine", dest="decoder_refine", type=int,
                   help="rvgc decoder fine-tuning: first give g_s a full-resolution head of this many channels")
    t.add_argument("--mid-blocks", dest="mid_blocks", type=int,
                   help="uqdm/diffc: residual blocks at the network's coarsest level (default 2); with --init, "
                   "blocks added to a trained network start as the identity (it starts out coding like before)")
    t.add_argument("--clip", type=float)
    t.add_argument("--ckpt-every", dest="ckpt_every", type=int)
    t.add_argument("--val-every", dest="val_every", type=int)
    t.add_argument("--val-batch", dest="val_batch", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--no-bf16", dest="bf16", action="store_false", default=None)
    t.add_argument("--resume", action="store_true", default=None)
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("demo", help="compress a bundled sample image and decode it progressively")
    e.add_argument("--model")
    e.add_argument("--image", help="use this image instead of the bundled sample")
    e.add_argument("--out", help="write the .dfc and decoded PNGs here")
    e.add_argument("--methods", default="denoise", help="comma list of denoise,flow,ancestral "
                   "(each decodes every prefix again)")
    e.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="rate-distortion evaluation of codecs and baselines on a folder of images",
                        description="Per-curve CompressAI-style JSON, per_image.csv, a BD-rate table (bd.txt) and "
                        "RD plots in --out. Resumable: points already recorded in --out/cache are skipped.")
    ev.add_argument("images", help="folder of images (png, jpg, ...)")
    ev.add_argument("--codec", help="comma list of diffcodec codecs: uqdm, diffc (progressive: every step of one "
                    "file is a point), rvgc (a sweep over q)")
    ev.add_argument("--model", help="comma list, one model per --codec (default: each codec's default model)")
    ev.add_argument("--methods", default="denoise", help="reconstructions, comma list: denoise,flow,ancestral "
                    "(rvgc: deterministic,sampler,default); CODEC:METHOD applies to one codec only (default: denoise)")
    ev.add_argument("--nfe", type=int, help="network evaluations of flow/ancestral (default: remaining steps)")
    ev.add_argument("--parts", help="uqdm: write the steps in parts ending at these fractions of their coordinates "
                    "(e.g. 0.05,0.2,0.35) and measure a point after every section (curves MODEL+parts-METHOD, "
                    "quality = the section count)")
    ev.add_argument("--keep", type=float, help="uqdm: files whose steps but the last two code only this fraction "
                    "of their coordinates (see compress; curves MODEL+keepF-METHOD); 1: files coding every "
                    "coordinate (curves MODEL-METHOD); default: the files compress writes (curves MODEL-METHOD)")
    ev.add_argument("--bpp", help="uqdm/diffc: one file per image and bpp target, comma list (e.g. "
                    "0.1,0.2,0.4,0.8,1.6,3.2), written by compress --bpp (rate control) instead of the prefixes of one "
                    "file (curves MODEL+bpp-METHOD, quality = the target)")
    ev.add_argument("--no-channel-aware", dest="channel_aware", action="store_false",
                    help="diffc/uqdm: reconstruct from the received latents as they are (see decompress)")
    ev.add_argument("--steps", help="progressive codecs: evaluate only these prefixes, e.g. 1-12 or 2,4,6 (steps "
                    "beyond a model's T are ignored; every step is still encoded; default: all)")
    ev.add_argument("--sampler-steps", dest="sampler_steps", type=int, help="rvgc: sampler network evaluations")
    ev.add_argument("--num-q", dest="num_q", type=int, default=6, help="rvgc: q values, log-spaced over its range")
    ev.add_argument("--baselines", default="", help="comma list of jpeg,jpeg2000,webp,avif,jpegxl,heic, or all")
    ev.add_argument("--out", required=True, help="output folder (reused: finished points are not recomputed)")
    ev.add_argument("--downscale", type=int, default=1, help="downscale images by this factor (antialiased)")
    ev.add_argument("--limit", type=int, help="only the first K images (sorted by name)")
    ev.add_argument("--pattern", help="glob of image files in the folder (default: common image suffixes)")
    ev.add_argument("--workers", type=int, default=1, help="parallel processes over images (1 torch thread each)")
    ev.add_argument("--no-swd", dest="no_swd", action="store_true", help="skip SWD (no reconstructions stored)")
    ev.add_argument("--bd-method", dest="bd_method", choices=["pchip", "cubic"], default="pchip")
    ev.add_argument("--swd-max-bpp", dest="swd_max_bpp", type=float, default=0.5,
                    help="swd_rate.txt compares SWD at equal bpp up to this rate (default 0.5)")
    ev.add_argument("--title", help="title of the RD plots (default: the image count and sizes)")
    ev.add_argument("-q", "--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="RD curves of result JSONs (from eval or CompressAI)")
    pl.add_argument("results", nargs="+", help="result JSON files")
    pl.add_argument("-o", "--output", required=True, help="PNG to write")
    pl.add_argument("--metric", default="psnr", choices=list(_PLOT_METRICS),
                    help="psnr (RGB), ms-ssim (dB: -10 log10(1-x)), ms-ssim-rgb, swd, lpips")
    pl.add_argument("--max-bpp", dest="max_bpp", type=float, help="leave out points above this rate")
    pl.add_argument("--title")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except DiffcodecError as e:
        print(f"diffcodec: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"diffcodec: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffcodec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
