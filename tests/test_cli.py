"""The command line: JSON outputs, progressive files, and one-line errors with non-zero exit codes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import diffcodec
from conftest import launcher_errors, synthetic_image
from diffcodec.cli import main


def run(*args):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "diffcodec.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(synthetic_image(22, 30)).save(path)
    return path


def test_compress_info_decompress_json(png, tmp_path, tiny_model_path, capsys):
    out = tmp_path / "a.dfc"
    assert main(["compress", str(png), "-o", str(out), "--model", str(tiny_model_path), "--lossless", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("codec", "model", "width", "height", "file_bytes", "bpp", "ideal_bits_total", "sections"):
        assert key in rep
    assert rep["file_bytes"] == out.stat().st_size and (rep["width"], rep["height"]) == (30, 22)
    assert {"step", "bytes", "ideal_bits"} <= set(rep["sections"][0])
    assert abs(rep["ideal_bits_total"] - sum(s["ideal_bits"] for s in rep["sections"])) < 1e-6

    assert main(["info", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["codec"] == "uqdm" and meta["total_steps"] == 4 and meta["model"] == "tiny-uqdm"
    assert [s["bytes"] for s in meta["sections"]] == [s["bytes"] for s in rep["sections"]]
    assert meta["sections"][-1]["offset"] + meta["sections"][-1]["bytes"] == out.stat().st_size

    dec = tmp_path / "a.png"
    assert main(["decompress", str(out), "-o", str(dec), "--model", str(tiny_model_path)]) == 0
    assert np.array_equal(np.asarray(Image.open(dec)), np.asarray(Image.open(png)))

    # partial download: cut after section 2 == --steps 2
    cut = tmp_path / "cut.dfc"
    cut.write_bytes(out.read_bytes()[: meta["sections"][1]["offset"] + meta["sections"][1]["bytes"]])
    a, b = tmp_path / "cut.png", tmp_path / "k2.png"
    assert main(["decompress", str(cut), "-o", str(a), "--model", str(tiny_model_path), "--method", "flow"]) == 0
    assert main(["decompress", str(out), "-o", str(b), "--model", str(tiny_model_path), "--method", "flow",
                 "--steps", "2"]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    capsys.readouterr()
    assert main(["info", str(cut)]) == 0
    assert "partial: 2 of 5 sections" in capsys.readouterr().out


def test_steps_and_bpp_options(png, tmp_path, tiny_model_path, capsys):
    sizes = []
    for k in (1, 2, 3):
        assert main(["compress", str(png), "-o", str(tmp_path / f"{k}.dfc"), "--model", str(tiny_model_path),
                     "--steps", str(k), "--json"]) == 0
        sizes.append(json.loads(capsys.readouterr().out)["bpp"])
    assert main(["compress", str(png), "-o", str(tmp_path / "b.dfc"), "--model", str(tiny_model_path),
                 "--bpp", str(sizes[1] + 1e-6), "--parts", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    # by default a target between two steps is met by a kept share (rate control): between the 1- and 2-step
    # files here, the file ends with step 2 coding fewer of its coordinates or step 1 coding more
    mid = (sizes[0] + sizes[1]) / 2
    assert main(["compress", str(png), "-o", str(tmp_path / "c.dfc"), "--model", str(tiny_model_path),
                 "--bpp", str(mid), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sizes[0] <= out["bpp"] <= mid and out["sections"][-1]["kind"] == "step"
    # with --parts: the longest prefix of a file written in parts
    assert main(["compress", str(png), "-o", str(tmp_path / "d.dfc"), "--model", str(tiny_model_path),
                 "--bpp", str(sizes[1] + 1e-6), "--parts", "0.5"]) == 0
    assert "1 step(s) and 1 part(s) of step 2," in capsys.readouterr().out


@pytest.mark.parametrize("content,msg", [(b"", "empty file"), (b"GIF89a....", "not a .dfc"),
                                         ("corrupt", "checksum")])
def test_bad_files_give_one_line_errors(tmp_path, png, tiny_model_path, content, msg):
    bad = tmp_path / "bad.dfc"
    if content == "corrupt":
        good = tmp_path / "g.dfc"
        assert main(["compress", str(png), "-o", str(good), "--model", str(tiny_model_path), "-q"]) == 0
        data = bytearray(good.read_bytes())
        data[-5] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:
        bad.write_bytes(content)
    for cmd in (["decompress", bad, "-o", tmp_path / "o.png"], ["info", bad]):
        code, out, err = run(*cmd)
        assert code != 0 and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffcodec: error:") and msg in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_wrong_model_names_the_model(png, tmp_path, tiny_model_path, other_model_path):
    f = tmp_path / "a.dfc"
    assert main(["compress", str(png), "-o", str(f), "--model", str(tiny_model_path), "-q", "--steps", "1"]) == 0
    code, _, err = run("decompress", f, "-o", tmp_path / "o.png", "--model", other_model_path)
    assert code == 1 and "wrong model" in err and "tiny-uqdm" in err and "Traceback" not in err


def test_image_errors(tmp_path, tiny_model_path):
    rgba = tmp_path / "alpha.png"
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba)
    code, _, err = run("compress", rgba, "-o", tmp_path / "x.dfc", "--model", tiny_model_path)
    assert code == 1 and "alpha" in err and "Traceback" not in err
    assert not (tmp_path / "x.dfc").exists()
    assert main(["compress", str(rgba), "-o", str(tmp_path / "x.dfc"), "--model", str(tiny_model_path),
                 "--drop-alpha", "-q", "--steps", "1"]) == 0
    notimg = tmp_path / "n.png"
    notimg.write_text("hello")
    code, _, err = run("compress", notimg, "-o", tmp_path / "y.dfc", "--model", tiny_model_path)
    assert code == 1 and "not a readable image" in err
    code, _, err = run("compress", tmp_path / "missing.png", "--model", tiny_model_path)
    assert code == 1 and "no such file" in err


def test_never_overwrites_input(png, tiny_model_path):
    before = png.read_bytes()
    code, _, err = run("compress", png, "-o", png, "--model", tiny_model_path, "--steps", "1")
    assert code == 1 and "refusing to overwrite" in err
    assert png.read_bytes() == before


def test_unknown_model_and_usage(png):
    code, _, err = run("compress", png, "--model", "no-such-model")
    assert code == 1 and "unknown model" in err
    code, _, err = run("compress", png, "--steps", "2", "--lossless")
    assert code == 2  # argparse usage error


def test_train_and_resume(tmp_path, image_folder):
    data = image_folder
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch", "4", "--crop", "16",
            "--val-batch", "4", "--ckpt-every", "2", "--val-every", "3", "-q"]
    assert main([*args, "--iters", "3"]) == 0
    assert (out / "model.safetensors").exists() and (out / "checkpoint.pt").exists()
    assert main([*args, "--iters", "5", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # resumed at 4, not restarted
    img = tmp_path / "x.png"
    Image.fromarray(synthetic_image(12, 12)).save(img)
    assert main(["compress", str(img), "--model", str(out / "model.safetensors"), "--lossless", "-q",
                 "-o", str(tmp_path / "x.dfc")]) == 0


def test_torchrun_ddp_training(tmp_path, image_folder):
    """The same train command under torchrun (2 processes, gloo on CPU)."""
    data = image_folder
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "diffcodec.cli", "--threads", "1", "train", "--data", str(data), "--out", str(out),
                        "--preset", "tiny", "--iters", "2", "--batch", "2", "--crop", "16", "--val-batch", "2",
                        "--ckpt-every", "2", "--val-every", "2", "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, launcher_errors(p.stderr)
    assert (out / "model.safetensors").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_compress_no_box_prior_writes_the_earlier_format(png, tmp_path, tiny_model_path, capsys):
    """--no-box-prior: a file in the uqdm format before 2026-12-07 (one header byte, the whole prior), bigger,
    decoding to the same image; the default writes the box-prior flag."""
    new, old = tmp_path / "new.dfc", tmp_path / "old.dfc"
    assert main(["compress", str(png), "-o", str(new), "--model", str(tiny_model_path), "--lossless", "-q",
                 "--keep", "1"]) == 0  # the same coordinates as the earlier format
    assert main(["compress", str(png), "-o", str(old), "--model", str(tiny_model_path), "--lossless", "-q",
                 "--no-box-prior"]) == 0
    a, b = new.read_bytes(), old.read_bytes()
    assert diffcodec.info(a)["box_prior"] is True and diffcodec.info(b)["box_prior"] is False
    assert len(a) < len(b)
    m = diffcodec.get_model(str(tiny_model_path))
    assert np.array_equal(diffcodec.decompress(a, model=m), diffcodec.decompress(b, model=m))
    capsys.readouterr()
    assert main(["info", str(new)]) == 0 and "coded under box priors" in capsys.readouterr().out
    assert main(["info", str(old)]) == 0 and "the format before box priors" in capsys.readouterr().out


def test_several_inputs_share_one_model_and_a_failure_does_not_stop_the_rest(tmp_path, tiny_model_path, capsys):
    srcs = []
    for k, (h, w) in enumerate([(22, 30), (17, 9), (8, 40)]):
        srcs.append(tmp_path / f"im{k}.png")
        Image.fromarray(synthetic_image(h, w, seed=k)).save(srcs[-1])
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "out"  # created
    args = ["compress", *map(str, [srcs[0], bad, *srcs[1:]]), "-o", str(out), "--model", str(tiny_model_path),
            "--lossless", "--json"]
    assert main(args) == 1  # one input failed ...
    cap = capsys.readouterr()
    reps = [json.loads(line) for line in cap.out.splitlines()]  # ... the three others were written, one line each
    assert [r["input"] for r in reps] == [str(s) for s in srcs]
    assert "bad.png" in cap.err and "not a readable image" in cap.err and "Traceback" not in cap.err
    for s, r in zip(srcs, reps):
        assert r["output"] == str(out / f"{s.stem}.dfc") and (out / f"{s.stem}.dfc").stat().st_size == r["file_bytes"]

    dec = tmp_path / "dec"
    assert main(["decompress", *[str(out / f"{s.stem}.dfc") for s in srcs], "-o", str(dec), "-q",
                 "--model", str(tiny_model_path)]) == 0
    for s in srcs:  # lossless: each decodes to its own image, named after it
        assert np.array_equal(np.asarray(Image.open(dec / f"{s.stem}.png")), np.asarray(Image.open(s)))
    # nothing is overwritten without --force, and every output is checked before any work
    code, _, err = run("decompress", *[out / f"{s.stem}.dfc" for s in srcs], "-o", dec, "--model", tiny_model_path)
    assert code == 1 and "exists" in err
    # without -o each output lies beside its input
    assert main(["compress", str(srcs[1]), "--model", str(tiny_model_path), "--steps", "1", "-q"]) == 0
    assert (tmp_path / "im1.dfc").exists()


def test_several_inputs_refuse_colliding_outputs_and_a_file_as_directory(tmp_path, tiny_model_path):
    a, b = tmp_path / "x" / "same.png", tmp_path / "y" / "same.png"
    for p in (a, b):
        p.parent.mkdir()
        Image.fromarray(synthetic_image(8, 8)).save(p)
    code, _, err = run("compress", a, b, "-o", tmp_path / "out", "--model", tiny_model_path)
    assert code == 1 and "would both be written" in err and not (tmp_path / "out").exists()
    f = tmp_path / "file.dfc"
    f.write_bytes(b"x")
    code, _, err = run("compress", a, b, "-o", f, "--model", tiny_model_path)
    assert code == 1 and "names a directory" in err
    # an output that is another input is refused, even with --force
    other = tmp_path / "x" / "same.dfc"
    other.write_bytes(b"keep me")
    code, _, err = run("compress", a, other, "--model", tiny_model_path, "--force")
    assert code == 1 and "would both be written" in err and other.read_bytes() == b"keep me"
    # one input and an existing directory: the output goes inside it
    assert main(["compress", str(a), "-o", str(tmp_path / "y"), "--model", str(tiny_model_path), "-q",
                 "--steps", "1"]) == 0
    assert (tmp_path / "y" / "same.dfc").exists()
