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


def cmd_compress(a) -> int:
    from .api import compress, get_model
    from .imageio import atomic_write

    model = get_model(a.model, a.codec or "uqdm")
    out = a.output or str(Path(a.input).with_suffix(".dfc"))
    total = model.num_steps if (a.lossless or a.bpp is not None) else (a.steps or 0)
    bar, cb = _progress(total, "encoding", a.quiet or a.json)
    try:
        res = compress(a.input, model=model, codec=a.codec, steps=a.steps, bpp=a.bpp, lossless=a.lossless,
                       seed=a.seed, alpha="drop" if a.drop_alpha else "error", progress=cb, c_max=a.c_max)
    finally:
        if bar:
            bar.close()
    atomic_write(out, res.data, inputs=(a.input,))
    if a.json:
        print(json.dumps({"output": out, **res.summary()}))
    elif not a.quiet:
        kind = "lossless" if res.lossless else f"{res.steps} step(s)"
        print(f"{a.input} -> {out}: {res.file_bytes} bytes, {res.bpp:.4f} bpp, {kind}, "
              f"model {res.model} (ideal {res.ideal_bits_total / 8:.0f} bytes)")
    return 0


def cmd_decompress(a) -> int:
    from .api import decompress
    from .imageio import write_image

    data = _read_input(a.input)
    # default name: never photo.png next to photo.dfc, which is likely the user's original
    out = a.output or str(Path(a.input).with_suffix(".decoded.png"))
    img = decompress(data, model=a.model, steps=a.steps, method=a.method, nfe=a.nfe)
    write_image(out, img, inputs=(a.input,))
    if not a.quiet:
        print(f"{a.input} -> {out}: {img.shape[1]}x{img.shape[0]}, method {a.method}")
    return 0


def cmd_info(a) -> int:
    from .api import info

    d = info(_read_input(a.input))
    if a.json:
        print(json.dumps(d))
        return 0
    print(f"{a.input}: {d['codec']} .dfc v{d['format_version']}, {d['width']}x{d['height']}x{d['channels']}, "
          f"model {d['model']} ({d['model_hash']}), {d['file_bytes']} bytes, {d['bpp']:.4f} bpp")
    state = "complete" if d["complete"] else f"partial: {d['sections_in_file']} of {d['sections_encoded']} sections"
    print(f"  {d['total_steps']} diffusion steps in the model; {state}")
    for s in d["sections"]:
        label = f"step {s['step']}" if s["kind"] == "step" else s["kind"]
        print(f"  section {s['index']:>2} {label:<9} offset {s['offset']:>8}  {s['bytes']:>8} bytes")
    return 0


def cmd_models(a) -> int:
    from .api import list_models

    ms = list_models()
    if a.json:
        print(json.dumps(ms))
        return 0
    if not ms:
        print("no bundled models")
    for m in ms:
        star = "*" if m.get("default") else " "
        print(f"{star} {m['name']:<14} codec={m.get('codec')} steps={m.get('steps')} "
              f"size={m.get('file_bytes', 0) / 1e6:.2f} MB  {m.get('summary', '')}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffcodec", description="Image compression with diffusion models.")
    p.add_argument("--version", action="version", version=f"diffcodec {__version__}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="image -> .dfc")
    c.add_argument("input")
    c.add_argument("-o", "--output")
    c.add_argument("--codec", choices=["uqdm", "diffc"], help="codec of the default model (default: uqdm, "
                   "or the codec of --model)")
    c.add_argument("--model", help="bundled model name or .safetensors path (default: the codec's default)")
    q = c.add_mutually_exclusive_group()
    q.add_argument("--steps", type=int, help="diffusion steps to send (1..T)")
    q.add_argument("--bpp", type=float, help="largest step count whose file fits this many bits/pixel")
    q.add_argument("--lossless", action="store_true", help="all steps plus the exact final section")
    c.add_argument("--seed", type=int, default=0, help="shared-randomness seed stored in the file")
    c.add_argument("--c-max", dest="c_max", type=int, help="diffc: bits per reverse-channel-coding chunk "
                   "(8..16; larger = slower, closer to an exact sample)")
    c.add_argument("--drop-alpha", action="store_true", help="discard an alpha channel instead of refusing")
    c.add_argument("--json", action="store_true", help="print one JSON object with sizes and ideal bits")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help=".dfc (complete or truncated) -> image")
    d.add_argument("input")
    d.add_argument("-o", "--output")
    d.add_argument("--model", help="model to decode with (default: the one named in the file)")
    d.add_argument("--steps", type=int, help="decode only the first K step sections")
    d.add_argument("--method", default="denoise", choices=["denoise", "ancestral", "flow"])
    d.add_argument("--nfe", type=int, help="network evaluations for ancestral/flow")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="describe a .dfc file")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list bundled models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a model on a folder of images (torchrun-ready)")
    t.add_argument("--codec", default="uqdm", choices=["uqdm", "diffc"])
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--preset", choices=["tiny", "small", "base"])
    t.add_argument("--num-steps", dest="num_steps", type=int, help="diffusion steps T (uqdm 4, diffc 16)")
    t.add_argument("--c-max", dest="c_max", type=int, help="diffc: reverse channel coding chunk cap (bits)")
    t.add_argument("--iters", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--crop", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--ema", type=float)
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
