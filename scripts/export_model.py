"""Bundle a trained model with the package, and write its model card from measured numbers.

    python scripts/export_model.py export RUN_DIR NAME [--default-steps K]
        copies RUN_DIR/model.safetensors (the EMA weights) to src/diffcodec/weights/NAME.safetensors,
        in float16 if that changes the held-out bits/dim by less than 0.1%, else float32; records the
        training facts (data, iterations, wall-clock, validation bits/dim) in the card metadata.
    python scripts/export_model.py card NAME --bench BENCH.json
        adds the Kodak benchmark results (benchmarks/*_kodak.py --json) to the card metadata and
        writes src/diffcodec/weights/NAME.md.  The weights, hence the model hash, are unchanged.
    python scripts/export_model.py defaults NAME [--sampler-max-q-by-pixels 49152:6.73,196608:8] [--summary S]
        changes a bundled rvgc model's decoder defaults (chosen on held-out photos) and/or the summary
        `diffcodec models` shows.  The weights, hence the model hash, are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffcodec.data import list_images, validation_batch
from diffcodec.models import build_model, load_model, read_metadata, save_model
from diffcodec.train import evaluate_bpd

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "diffcodec" / "weights"


def _val_bpd(model, data: str, crop: int) -> float:
    return evaluate_bpd(model.float(), validation_batch(data, crop, 64))


def export(run: Path, name: str, default_steps: int | None, c_max: int | None = None,
           default_q: float | None = None, eta: float | None = None, sampler_steps: int | None = None,
           sampler_max_q: float | None = None) -> None:
    src = run / "model.safetensors"
    meta = read_metadata(src)
    card = meta["card"]
    tcfg = card.get("train", {})
    fp32 = load_model(str(src))
    bpd32 = _val_bpd(fp32, tcfg["data"], tcfg["crop"])
    tmp = run / "model-fp16.safetensors"
    save_model(fp32, tmp, card=card, half=True)
    bpd16 = _val_bpd(load_model(str(tmp)), tcfg["data"], tcfg["crop"])
    half = abs(bpd16 - bpd32) / bpd32 < 1e-3
    tmp.unlink()
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    model = load_model(str(src))
    if c_max is not None:  # an encoder default (not part of the weights or the model hash)
        model.c_max = c_max
    if eta is not None:  # rvgc: the sampler's default randomness (a decoder default, not in the hash)
        model.eta = eta
    if sampler_steps is not None:  # rvgc decoder defaults, like eta
        model.sampler_steps = sampler_steps
    if sampler_max_q is not None:
        model.sampler_max_q = sampler_max_q
    new_card = {
        "summary": f"{model.codec_id} model, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params",
        **({"default_q": default_q or 4.0} if model.codec_id == "rvgc" else
           {"default_steps": default_steps or card.get("default_steps") or max(1, model.num_steps // 2)}),
        "data": f"{Path(tcfg['data']).name}/ ({len(list_images(tcfg['data']))} photos, held-out every 20th)",
        "train": tcfg,
        "iterations": logs[-1]["step"],
        "wallclock_s": logs[-1]["elapsed"],
        "val_bpd_fp32": round(bpd32, 4),
        "val_bpd_stored": round(bpd16 if half else bpd32, 4),
        "stored_dtype": "float16" if half else "float32",
    }
    h = save_model(model.float(), WEIGHTS / f"{name}.safetensors", card=new_card, half=half)
    print(json.dumps({"name": name, "hash": h, **{k: v for k, v in new_card.items() if k != "train"}}, indent=1))


def _training_line(c: dict) -> str:
    t = c["train"]
    return (f"* training: {c['iterations']} iterations of batch {t['batch']} random {t['crop']}x{t['crop']} crops, "
            f"Adam lr {t['lr']} (warm-up {t['warmup']}, cosine), EMA {t['ema']}, preset `{t['preset']}`, "
            f"{c['wallclock_s'] / 3600:.2f} h wall-clock on a 2-core CPU")


def _rewrite_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace a model file's metadata (config, card) atomically; its tensors, hence its hash, stay byte
    for byte."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)


def card(name: str, bench: Path, note: str | None = None) -> None:
    path = WEIGHTS / f"{name}.safetensors"
    meta = read_metadata(path)
    c = meta["card"]
    b = json.loads(bench.read_text())
    c["kodak"] = b["summary"] if "summary" in b else {k: v for k, v in b.items() if k not in ("model", "model_hash")}
    _rewrite_metadata(path, {"diffcodec.config": json.dumps(meta["config"]), "diffcodec.card": json.dumps(c)})
    model = load_model(str(path))
    if model.codec_id == "rvgc":
        lines = rvgc_lines(name, c, b, model, path, note)
        (WEIGHTS / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines = [
        f"# Model card: {name}", "",
        f"* codec: `{model.codec_id}`, {model.num_steps} diffusion steps, model hash `{model.model_hash}`",
        f"* {c['summary']}; weights stored as {c['stored_dtype']} "
        f"({path.stat().st_size / 1e6:.2f} MB); default quality: {c['default_steps']} steps",
        f"* data: {c['data']} — never Kodak",
        _training_line(c),
        f"* held-out validation code length ({'exact, all steps' if model.codec_id == 'uqdm' else 'VDM NELBO'}): "
        f"{c['val_bpd_stored']} bits/dim (fp32 weights: {c['val_bpd_fp32']})", "",
    ]
    if note:
        lines += [f"Measurement conditions: {note}", ""]
    if "summary" not in b:
        lines += diffc_lines(b, model)
        (WEIGHTS / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    s = b["summary"]
    lines += [
        f"## Kodak, {s['images']} images at {s['size']} (`benchmarks/{model.codec_id}_kodak.py`)", "",
        f"* file bits / ideal bits: mean {s['rate_ratio_mean']:.5f}, max {s['rate_ratio_max']:.5f}; "
        f"container overhead <= {s['overhead_bytes_max']} bytes",
    ]
    if "lossless_bpd" in s:
        lines.append(f"* lossless: {s['lossless_bpd']:.3f} bits/dim "
                     f"({'all bit-exact' if s['lossless_all_exact'] else 'NOT exact'})")
    lines.append(f"* seconds per image: encode {s['encode_s']:.1f}, decode {s['decode_s']:.1f}")
    lines += ["", "| steps | bpp | " + " | ".join(f"PSNR {m}" for m in s["steps"][0] if m not in ("step", "bpp"))
              + " |", "|---" * len(s["steps"][0]) + "|"]
    for r in s["steps"]:
        vals = [f"{r[m]:.2f}" for m in r if m not in ("step", "bpp")]
        lines.append(f"| {r['step']} | {r['bpp']:.3f} | " + " | ".join(vals) + " |")
    lines += ["", "Reproduce: see the commands in the README (Benchmarks) and `scripts/export_model.py`."]
    (WEIGHTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _rvgc_decoder_text(model) -> str:
    sampler = f"{model.sampler_steps}-step latent sampler (eta {model.eta:g})"
    if model.sampler_max_q is not None and model.sampler_max_q < model.q_range[0]:
        return f"default decoder: the plain synthesis at every q; the {sampler} on request"
    larger = ", ".join(f"{mq:g} from {px} pixels" for px, mq in model.sampler_max_q_by_pixels)
    larger = f" ({larger})" if larger else ""
    return f"decoder: {sampler}" + (f" up to q {model.sampler_max_q:g}{larger}, plain synthesis above"
                                    if model.sampler_max_q is not None else "")


def set_defaults(name: str, sampler_max_q_by_pixels: str | None = None, summary: str | None = None) -> None:
    """Rewrite a bundled model's decoder defaults (rvgc: ``PIXELS:Q,...``) and/or its card's one-line
    summary (what ``diffcodec models`` shows); its tensors stay byte for byte."""
    path = WEIGHTS / f"{name}.safetensors"
    meta = read_metadata(path)
    cfg, c = meta["config"], meta["card"]
    h = load_model(str(path)).model_hash
    if sampler_max_q_by_pixels is not None:
        cfg["sampler_max_q_by_pixels"] = [[int(px), float(q)] for px, q in
                                          (pair.split(":") for pair in sampler_max_q_by_pixels.split(",") if pair)]
        try:  # the model class validates it (it must refine a sampler_max_q)
            cfg = build_model(cfg).config_dict()
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
    if summary is not None:
        params = c.get("summary", "").rsplit(", ", 1)[-1]
        c["summary"] = f"{summary}, {params}" if params.endswith("M params") else summary  # keeps the count
    _rewrite_metadata(path, {"diffcodec.config": json.dumps(cfg), "diffcodec.card": json.dumps(c)})
    again = load_model(str(path))
    assert again.model_hash == h
    print(f"{name}: {c.get('summary', '')}" + (f"; {_rvgc_decoder_text(again)}" if again.codec_id == "rvgc" else "")
          + f"; hash {h}")


def rvgc_lines(name: str, c: dict, b: dict, model, path: Path, note: str | None) -> list[str]:
    """Model card of an RVGC model from ``benchmarks/rvgc_kodak.py --json``."""
    lo, hi = model.q_range
    lines = [
        f"# Model card: {name}", "",
        f"* codec: `rvgc`, q range [{lo:g}, {hi:g}], model hash `{model.model_hash}`",
        f"* {c['summary']}; weights stored as {c['stored_dtype']} ({path.stat().st_size / 1e6:.2f} MB); "
        f"default q {c['default_q']:g}; " + _rvgc_decoder_text(model),
        f"* data: {c['data']} — never Kodak",
        _training_line(c) + "; one loss: bpp + lambda(q) MSE + latent "
        f"denoising, lambda from {model.lambda_range[0]:g} (q_min) to {model.lambda_range[1]:g} (q_max)",
        f"* held-out validation loss (q drawn with a fixed seed): {c['val_bpd_stored']:.4f} "
        f"(fp32 weights: {c['val_bpd_fp32']:.4f})", "",
    ]
    if note:
        lines += [f"Measurement conditions: {note}", ""]
    lines += [f"## Kodak, {b['images']} images downscaled {b['scale']}x (`benchmarks/rvgc_kodak.py`)", "",
              f"Rate monotone in q on every image: {'yes' if b['rate_monotone_in_q'] else 'NO'}.  "
              "SWD: sliced Wasserstein distance of multi-scale Laplacian patches to the originals (x1e3, lower "
              "= more realistic).", ""]
    decoders = list(b["rows"][0]["decoders"])
    lines += ["| q | bpp | " + " | ".join(f"{d} PSNR / MS-SSIM / SWD" for d in decoders) + " |",
              "|---" * (2 + len(decoders)) + "|"]
    for r in b["rows"]:
        cells = [f"{v['psnr']:.2f} / {v['ms-ssim']:.4f} / {v['swd']:.1f}" for v in r["decoders"].values()]
        lines.append(f"| {r['q']:g} | {r['bpp']:.4f} | " + " | ".join(cells) + " |")
    r0 = b["rows"][len(b["rows"]) // 2]
    lines += ["", "Seconds per image (at q = " + f"{r0['q']:g}): encode {r0['encode_s']:.2f}; decode "
              + ", ".join(f"{d} {v['decode_s']:.2f}" for d, v in r0["decoders"].items())
              + "; per sampler step " + ", ".join(f"{v['s_per_sampler_step']:.3f}" for d, v in r0["decoders"].items()
                                                 if "s_per_sampler_step" in v), "",
              "Reproduce: `python benchmarks/rvgc_kodak.py --json rvgc.json` and `scripts/export_model.py`."]
    return lines


def diffc_lines(b: dict, model) -> list[str]:
    """Model-card section from ``benchmarks/diffc_kodak.py --json``."""
    lines = [f"## Kodak, {b['images']} images at {b['size']} (`benchmarks/diffc_kodak.py`)", "",
             f"Default channel-coding chunk cap c_max = {model.c_max} bits.", "",
             "| c_max | file bits / sum of step KLs | payload bits / KL | s/step network | s/step channel |",
             "|---|---|---|---|---|"]
    for c_max, r in b.get("rate_by_c_max", {}).items():
        lines.append(f"| {c_max} | {r['ratio_file']:.4f} | {r['ratio_payload']:.4f} | "
                     f"{r['network_s_per_step']:.2f} | {r['channel_s_per_step']:.2f} |")
    rd = b["rd"]
    c_b = b.get("part_b_c_max", b["default_c_max"])
    ideal_anc = "ideal_flow_minus_ancestral_db" in rd  # benchmarks before the ideal chain had ancestral
    lines += ["", f"Progressive RD at c_max {c_b} (PSNR dB; ideal = exact Gaussian samples at a rate "
              "of exactly the KL, i.e. a perfect channel):", "",
              "| steps | bpp | denoise | flow | ancestral | ideal bpp | ideal flow"
              + (" | ideal ancestral |" if ideal_anc else " |"),
              "|---|---|---|---|---|---|---|" + ("---|" if ideal_anc else "")]
    for k, r in rd["real"].items():
        i = rd["ideal"][k]
        lines.append(f"| {k} | {r['bpp']:.3f} | {r['denoise']:.2f} | {r['flow']:.2f} | {r['ancestral']:.2f} | "
                     f"{i['bpp']:.3f} | {i['flow']:.2f} |" + (f" {i['ancestral']:.2f} |" if ideal_anc else ""))
    gap = rd.get("gap_db_mean")
    lines += ["", "* fidelity lost to channel coding (real flow minus ideal flow at the same bpp): "
              + (f"{gap:+.2f} dB on average; per step: "
                 + ", ".join(f"{g['step']}: {g['gap_db']:+.2f}" for g in rd["gap"]) if gap is not None else "n/a"),
              f"* flow minus ancestral at step {rd['flow_vs_ancestral_step']}: "
              f"{rd['flow_minus_ancestral_db']:+.2f} dB"
              + (f" (ideal channel: {rd['ideal_flow_minus_ancestral_db']:+.2f} dB)" if ideal_anc else "")]
    if "gap_by_nfe" in b:
        g = b["gap_by_nfe"]
        lines += ["", "Flow vs ancestral by the number of network evaluations (NFE) of the reconstruction "
                  "(`--gap-nfe`; ancestral approaches a true sample of the continuous-time model only "
                  "with fine steps):", "",
                  "| step | chain | denoise | " + " | ".join(f"flow / ancestral, NFE {n}" for n in g["nfe"]) + " |",
                  "|---|---|---|" + "---|" * len(g["nfe"])]
        for src in ("real", "ideal"):
            for k, r in g[src].items():
                lines.append(f"| {k} | {src} | {r['denoise']:.2f} | " + " | ".join(
                    f"{r['flow'][str(n)]:.2f} / {r['ancestral'][str(n)]:.2f} "
                    f"({r['flow_minus_ancestral_db'][str(n)]:+.2f})" for n in g["nfe"]) + " |")
    reproduce = "Reproduce: `python benchmarks/diffc_kodak.py --json diffc.json` and `scripts/export_model.py`."
    return lines + ["", reproduce]


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("run", type=Path)
    e.add_argument("name")
    e.add_argument("--default-steps", type=int)
    e.add_argument("--c-max", type=int, help="diffc: default chunk cap of the channel coder")
    e.add_argument("--default-q", type=float, help="rvgc: default quantisation step")
    e.add_argument("--eta", type=float, help="rvgc: default randomness of the latent sampler")
    e.add_argument("--sampler-steps", type=int, help="rvgc: default steps of the latent sampler")
    e.add_argument("--sampler-max-q", type=float, help="rvgc: above this q the default decoder is the plain synthesis")
    c = sub.add_parser("card")
    c.add_argument("name")
    c.add_argument("--bench", type=Path, required=True)
    c.add_argument("--note", help="measurement conditions (threads, machine load) for the card")
    d = sub.add_parser("defaults")
    d.add_argument("name")
    d.add_argument("--sampler-max-q-by-pixels", metavar="PIXELS:Q,...",
                   help="rvgc: for images of at least PIXELS pixels the default decoder samples up to Q")
    d.add_argument("--summary", help="what the model is for, shown by diffcodec models (the parameter count is kept)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.cmd == "export":
        export(a.run, a.name, a.default_steps, a.c_max, a.default_q, a.eta, a.sampler_steps, a.sampler_max_q)
    elif a.cmd == "defaults":
        set_defaults(a.name, a.sampler_max_q_by_pixels, a.summary)
    else:
        card(a.name, a.bench, a.note)


if __name__ == "__main__":
    sys.exit(main())
