"""DiffC on Kodak: rate vs KL per c_max, fidelity lost to channel coding, flow vs ancestral, speed.

    python benchmarks/diffc_kodak.py [--model diffc-small4] [--limit 4] [--c-max 8,10,12]
                                     [--points 2,4,6,8,10,12,14,16] [--nfe 4] [--json out.json]
                                     [--gap-nfe 4,16,64 [--gap-points 14]] [--raw] [--efficiency]

Part A, for every c_max: encode all T steps of each image and report file bits / sum of step KLs
(the ideal cost of exact channel simulation) and seconds per step spent in reverse channel coding
vs in the network.
Part B, at the model's default c_max: from the prefixes in ``--points`` reconstruct with
denoise / flow / ancestral and compare with the *ideal channel*: the same chain with exact
Gaussian samples z_s ~ q(z_s | z_t, x), at a rate of exactly the sum of KLs.  The gap is the
PSNR of the real flow curve minus the ideal flow curve interpolated at the same bpp (dB,
negative = channel coding loses fidelity).  Flow vs ancestral is reported at the highest point,
for the real files and for the ideal chain.
Part C (``--gap-nfe``, e.g. 4,16,64): flow and ancestral from the prefixes in ``--gap-points``
(default: the highest point below T) with each number of network evaluations, real files and
ideal chain.  Why: the model is continuous-time, so ancestral is a sample of the model's reverse
process only in the limit of fine steps; with few steps each step's posterior mean does much of the
work and the result lies between denoise and a true sample (Theis et al.'s ~3 dB over ancestral
is for exact samples).  This shows how the flow-ancestral gap depends on the sampler's resolution.
Real files are reconstructed as ``decompress`` does, from the channel-aware latent (the coder's
shortfall undone, :func:`diffcodec.codecs.diffc.undo_shortfall`); ``--raw`` adds the same parts from
the received latents as they are (keys ``*_raw``), as the decoder did before.
Part D (``--efficiency``): per step, the projection efficiency the encoder achieved against the
decoder's estimate of it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import diffcodec
from diffcodec import channel, container
from diffcodec.api import _open, _prepare
from diffcodec.evaluate import load_images
from diffcodec.metrics import psnr
from diffcodec.rng import ANCESTRAL, SeededStream
from diffcodec.schedule import pixel_to_unit


class Timer:
    """Accumulates seconds spent in wrapped functions."""

    def __init__(self):
        self.t = {"network": 0.0, "channel": 0.0}

    def wrap(self, obj, name: str, key: str):
        fn = getattr(obj, name)

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0

        setattr(obj, name, wrapped)
        return fn


def part_a(model, images, c_maxes: list[int]) -> dict:
    out = {}
    for c_max in c_maxes:
        rows = []
        for name, img in images:
            tm = Timer()
            orig_net = tm.wrap(model, "eval_f64", "network")
            orig_ch = tm.wrap(channel, "encode_step", "channel")
            try:
                res = diffcodec.compress(img, model=model, steps=model.num_steps, c_max=c_max)
            finally:
                model.eval_f64 = orig_net
                channel.encode_step = orig_ch
            payload_bits = 8 * sum(s["payload_bytes"] for s in res.sections)
            rows.append({"image": name, "file_bits": 8 * res.file_bytes, "payload_bits": payload_bits,
                         "kl_bits": res.ideal_bits_total, "ratio_file": 8 * res.file_bytes / res.ideal_bits_total,
                         "ratio_payload": payload_bits / res.ideal_bits_total,
                         "network_s_per_step": tm.t["network"] / model.num_steps,
                         "channel_s_per_step": tm.t["channel"] / model.num_steps})
            print(f"c_max {c_max} {name}: file/KL {rows[-1]['ratio_file']:.4f} payload/KL "
                  f"{rows[-1]['ratio_payload']:.4f}, per step: network {rows[-1]['network_s_per_step']:.2f}s "
                  f"channel {rows[-1]['channel_s_per_step']:.2f}s", flush=True)
        out[c_max] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    return out


def _ideal_latents(model, img, seed, points):
    """Exact samples of q(z_s|z_t,x): yields (k, z, gamma, steps remaining, cumulative KL bpp) at the
    given prefixes."""
    pixels, h, w, _ = _prepare(img, "error", model)
    x = pixel_to_unit(pixels.astype(np.float64))[None]
    gam = model.gamma_grid(model.num_steps)
    z = model.initial_latent(x.shape, seed)
    rng = np.random.default_rng(seed + 12345)
    T = model.num_steps
    kl = 0.0
    for k, i in enumerate(range(T, 0, -1), 1):
        mu_p, a, b, beta = model._prior(z, i, gam)
        mu_q = a * z + b * x
        kl += float(0.5 * np.sum(((mu_q - mu_p) / beta) ** 2) / np.log(2))
        z = mu_q + beta * rng.standard_normal(z.shape)
        if k in points:
            yield k, z, float(gam[i - 1]), i - 1, kl / (h * w)


def _psnrs(model, img, z, gamma, remaining, seed, methods, nfe) -> dict:
    """PSNR of each reconstruction of latent z (ancestral with the decoder's own random stream, as
    ``decompress`` draws it)."""
    h, w, _ = img.shape
    out = {}
    for method in methods:
        y = model.reconstruct(z, gamma, method=method, nfe=nfe, rng=SeededStream(seed, ANCESTRAL),
                              default_steps=max(1, remaining))
        out[method] = psnr(img, y[0, :, :h, :w].transpose(1, 2, 0))
    return out


def _ideal_chain(model, img, seed, points, nfe):
    """Cumulative KL bpp and denoise/flow/ancestral PSNR of the ideal chain at the given prefixes."""
    return {k: {"bpp": bpp, **_psnrs(model, img, z, g, rem, seed, ("denoise", "flow", "ancestral"), nfe)}
            for k, z, g, rem, bpp in _ideal_latents(model, img, seed, points)}


def top_point(points: list[int], T: int) -> int:
    """Highest received step that still leaves reverse steps to generate (at z_0 all methods agree)."""
    return max((k for k in points if k < T), default=points[-1])


def encode_all(model, images) -> dict[str, bytes]:
    """Each image coded with all T steps at the model's c_max (parts B and C decode the same files)."""
    return {name: diffcodec.compress(img, model=model, steps=model.num_steps).data for name, img in images}


def part_b(model, images, points: list[int], nfe: int, files: dict[str, bytes] | None = None,
           views: tuple[str, ...] = ("real",)) -> dict:
    """Per view (``real``: the decoder's channel-aware latent, ``real_raw``: the received latent as it
    is) and for the ideal chain: bpp and denoise / flow / ancestral PSNR at each prefix."""
    T = model.num_steps
    files = files or encode_all(model, images)
    real = {v: {k: [] for k in points} for v in views}
    ideal = {k: [] for k in points}
    for name, img in images:
        h, w, _ = img.shape
        data = files[name]
        cont = container.unpack(data)
        ends = [o + s for o, s in zip(cont.offsets, cont.sizes)]
        for v in views:
            for k, recs in diffcodec.decode_steps(data, model=model, methods=("denoise", "flow", "ancestral"),
                                                  nfe=nfe, at=set(points), channel_aware=v == "real"):
                real[v][k].append({"bpp": 8.0 * ends[k - 1] / (h * w), **{m: psnr(img, y) for m, y in recs.items()}})
        for k, row in _ideal_chain(model, img, cont.header.seed, points, nfe).items():
            ideal[k].append(row)
        v0 = views[0]
        print(f"{name}: " + " ".join(f"k{k}:{real[v0][k][-1]['bpp']:.2f}bpp flow {real[v0][k][-1]['flow']:.2f}"
                                     f"/ideal {ideal[k][-1]['flow']:.2f}@{ideal[k][-1]['bpp']:.2f}"
                                     for k in points), flush=True)

    def avg(rows):
        return {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}

    i = {k: avg(v) for k, v in ideal.items()}
    ib = np.array([i[k]["bpp"] for k in points])
    top = top_point(points, T)
    out = {"ideal": i, "flow_vs_ancestral_step": top,
           "ideal_flow_minus_ancestral_db": i[top]["flow"] - i[top]["ancestral"]}
    for v in views:
        r = {k: avg(rows) for k, rows in real[v].items()}
        gaps = []
        for k in points:
            # ideal flow PSNR interpolated (in log-rate) at the real curve's rate; only inside the range
            if ib.min() <= r[k]["bpp"] <= ib.max():
                ref = float(np.interp(np.log(r[k]["bpp"]), np.log(ib), [i[q]["flow"] for q in points]))
                gaps.append({"step": k, "bpp": r[k]["bpp"], "gap_db": r[k]["flow"] - ref})
        sfx = v[len("real"):]
        out.update({f"real{sfx}": r, f"gap{sfx}": gaps,
                    f"gap_db_mean{sfx}": float(np.mean([g["gap_db"] for g in gaps])) if gaps else None,
                    f"flow_minus_ancestral_db{sfx}": r[top]["flow"] - r[top]["ancestral"]})
    return out


def part_c(model, images, points: list[int], nfes: list[int], files: dict[str, bytes] | None = None,
           views: tuple[str, ...] = ("real",)) -> dict:
    """Flow and ancestral PSNR per number of network evaluations: real files (per view, as in part B)
    and the ideal chain."""
    files = files or encode_all(model, images)
    rows = {src: {k: [] for k in points} for src in (*views, "ideal")}
    for name, img in images:
        data = files[name]
        hd, m, step_secs, _, shape = _open(data, model, None, None)
        states = [(k, st) for k, st in enumerate(m.iter_latents(shape, hd.seed, step_secs), 1) if k in points]
        sources = [(v, [(k, *st.latent(v == "real"), st.remaining) for k, st in states]) for v in views]
        ideal = ((k, z, g, rem) for k, z, g, rem, _ in _ideal_latents(model, img, hd.seed, points))
        for src, latents in (*sources, ("ideal", ideal)):
            for k, z, g, rem in latents:
                row = _psnrs(model, img, z, g, rem, hd.seed, ("denoise",), None)
                for n in nfes:
                    row.update({f"{mt}_{n}": v for mt, v in
                                _psnrs(model, img, z, g, rem, hd.seed, ("flow", "ancestral"), n).items()})
                rows[src][k].append(row)
                print(f"{name} {src} k{k}: denoise {row['denoise']:.2f} " + " ".join(
                    f"nfe {n}: flow {row[f'flow_{n}']:.2f} anc {row[f'ancestral_{n}']:.2f}" for n in nfes),
                    flush=True)
    out = {"nfe": nfes, "points": points}
    for src, by_k in rows.items():
        out[src] = {}
        for k, rs in by_k.items():
            mean = {key: float(np.mean([r[key] for r in rs])) for key in rs[0]}
            out[src][k] = {"denoise": mean["denoise"],
                           "flow": {n: mean[f"flow_{n}"] for n in nfes},
                           "ancestral": {n: mean[f"ancestral_{n}"] for n in nfes},
                           "flow_minus_ancestral_db": {n: mean[f"flow_{n}"] - mean[f"ancestral_{n}"] for n in nfes}}
    return out


def part_d(model, images, files: dict[str, bytes]) -> dict:
    """Per step: the projection efficiency E[X.m] / |m|^2 the encoder achieved (it knows m), the
    decoder's estimate (:func:`channel.estimate_efficiency`, from X and the layout only) and the
    layout's simulated value (:func:`channel.projection_efficiency`), averaged over the images."""
    T = model.num_steps
    gam = model.gamma_grid(T)
    rows: dict[int, list[dict]] = {k: [] for k in range(1, T + 1)}
    for name, img in images:
        hd, m, step_secs, _, shape = _open(files[name], model, None, None)
        pixels, _, _, _ = _prepare(img, "error", model)
        x = pixel_to_unit(pixels.astype(np.float64))[None]
        z_prev = m.initial_latent(shape, hd.seed)
        with m.reuse_evaluations():  # the prior below is the one step k was just decoded with: not re-evaluated
            for k, st in enumerate(m.iter_latents(shape, hd.seed, step_secs), 1):
                i = T - k + 1
                mu_p, a, b, beta = m._prior(z_prev, i, gam)
                X = (st.z - mu_p) / beta
                target = (a * z_prev + b * x - mu_p) / beta
                layout = channel.StepLayout.from_bytes(step_secs[k - 1].params)
                if layout.n_chunks:
                    rows[k].append({"kl_bits": layout.kl_units / channel.KL_UNITS_PER_BIT,
                                    "actual": float(np.sum(X * target) / np.sum(target * target)),
                                    "estimate": channel.estimate_efficiency(X, layout),
                                    "layout": channel.projection_efficiency(layout)})
                z_prev = st.z
    out = {k: {key: float(np.mean([r[key] for r in rs])) for key in rs[0]} for k, rs in rows.items() if rs}
    for k, r in out.items():
        print(f"step {k}: {r['kl_bits']:.0f} bits, efficiency actual {r['actual']:.3f} estimate {r['estimate']:.3f} "
              f"layout {r['layout']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kodak", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/kodak"))
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--model", default="diffc-small4")
    ap.add_argument("--c-max", default="8,10,12")
    ap.add_argument("--points", default="")
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--gap-nfe", default="", help="part C: numbers of network evaluations, e.g. 4,16,64")
    ap.add_argument("--gap-points", default="", help="part C prefixes (default: the highest point below T)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true", help="no part B (e.g. to run part C alone)")
    ap.add_argument("--b-c-max", type=int, help="part B at this c_max instead of the model's default")
    ap.add_argument("--raw", action="store_true", help="parts B and C also from the received latents as they "
                    "are (decompress --no-channel-aware), beside the channel-aware ones")
    ap.add_argument("--efficiency", action="store_true", help="part D: projection efficiency per step, the "
                    "encoder's against the decoder's estimate")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = diffcodec.get_model(a.model)
    default_c_max = model.c_max
    if a.b_c_max:
        model.c_max = a.b_c_max
    T = model.num_steps
    points = [int(p) for p in a.points.split(",")] if a.points else sorted({max(1, T * j // 8) for j in range(1, 9)})
    images = list(load_images(a.kodak, scale=a.scale, limit=a.limit, pattern="kodim*.png").items())
    result = {"model": model.model_id, "model_hash": model.model_hash, "images": len(images),
              "size": f"{images[0][1].shape[1]}x{images[0][1].shape[0]}", "default_c_max": default_c_max,
              "part_b_c_max": model.c_max}
    if not a.skip_a:
        result["rate_by_c_max"] = part_a(model, images, [int(c) for c in a.c_max.split(",")])
    files = encode_all(model, images)
    views = ("real", "real_raw") if a.raw else ("real",)
    if a.efficiency:
        result["efficiency"] = part_d(model, images, files)
    if not a.skip_b:
        result["rd"] = part_b(model, images, points, a.nfe, files, views)
    if a.gap_nfe:
        gap_points = [int(p) for p in a.gap_points.split(",")] if a.gap_points else [top_point(points, T)]
        result["gap_by_nfe"] = part_c(model, images, gap_points, [int(n) for n in a.gap_nfe.split(",")], files,
                                      views)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
