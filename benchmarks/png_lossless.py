"""Lossless reference: PNG (Pillow, optimize=True, compress_level 9) bits/dim on Kodak.

    python benchmarks/png_lossless.py [--kodak ../shared/data/kodak] [--scale 4] [--limit N] [--json out.json]

The number to compare with UQDM's lossless bits/dim (``benchmarks/uqdm_kodak.py``, whole .dfc file)
on the same images.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffcodec.evaluate import load_images


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kodak", default=str(here.parent.parent / "shared" / "data" / "kodak"))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--limit", type=int, help="only the first N images (as benchmarks/uqdm_kodak.py --limit)")
    p.add_argument("--json")
    a = p.parse_args()
    per = {}
    for name, img in load_images(a.kodak, scale=a.scale, limit=a.limit).items():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", optimize=True, compress_level=9)
        per[name] = 8.0 * buf.tell() / img.size
    out = {"images": len(per), "scale": a.scale, "png_bits_per_dim_mean": float(np.mean(list(per.values()))),
           "per_image": per}
    print(f"PNG: {out['png_bits_per_dim_mean']:.3f} bits/dim over {len(per)} images (scale {a.scale})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
