"""CLI smoke tests: generate / eval, --json, and every bad-input case (exit 2, one line, no file)."""

import json
import subprocess
import sys

import pytest

from hasten.pipeline import HastenPipeline
from hasten.testing import run_cli


def test_generate_writes_grid_and_reports_nfe(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = run_cli(capsys, "generate", "--model", "digits", "--labels", "0-2", "--per-label", "2",
                              "--steps", "3", "--cfg", "3", "--seed", "0", "--out", str(out), "--json")
    assert code == 0
    payload = json.loads(stdout)
    assert payload["images"] == 6 and payload["nfe"] == 6 and payload["transformer_calls"] == 3
    assert payload["wall_s"] > 0
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 16 and img.mode == "L"


def test_generate_text_output(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "generate", "--labels", "7", "--per-label", "1", "--steps", "2",
                              "--out", str(tmp_path / "g.png"))
    assert code == 0 and "NFE per image 4" in stdout and "wall time" in stdout


def test_eval_json(capsys):
    code, stdout, _ = run_cli(capsys, "eval", "--samples", "20", "--steps", "2", "--batch-size", "20", "--json")
    assert code == 0
    res = json.loads(stdout)
    assert set(res) >= {"class_accuracy", "fd_digits", "fd_real_vs_real", "fd_ratio", "fd_ratio_same_n", "nfe",
                        "wall_s"}
    assert 0 <= res["class_accuracy"] <= 1 and res["fd_real_vs_real"] > 0 and res["nfe"] == 4
    # 20 real images are far from the held-out split too: the same-n reference is the larger one
    assert res["fd_real_subset_same_n"] > res["fd_real_vs_real"] and res["fd_ratio_same_n"] < res["fd_ratio"]


@pytest.fixture
def bad_folders(tmp_path):
    import torch
    from diffusers import DiTTransformer2DModel

    t = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_num_groups=16)
    torch.manual_seed(0)
    HastenPipeline(t).save_pretrained(tmp_path / "corrupt")
    next((tmp_path / "corrupt" / "transformer").glob("*.safetensors")).write_bytes(b"\x00garbage")
    HastenPipeline(t).save_pretrained(tmp_path / "mismatch")
    meta = tmp_path / "mismatch" / "hasten_pipeline.json"
    meta.write_text(meta.read_text().replace('"num_classes": 10', '"num_classes": 3'))
    HastenPipeline(t).save_pretrained(tmp_path / "badmeta")
    (tmp_path / "badmeta" / "hasten_pipeline.json").write_text('{"num_classes": "ten"}')
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes(b"a red circle\xff\n")
    return tmp_path


@pytest.mark.parametrize("args,match", [
    (["generate", "--model", "nope"], "unknown model"),
    (["generate", "--labels", "0-10"], "out of range"),
    (["generate", "--labels", "x"], "cannot read labels"),
    (["generate", "--steps", "0"], "steps"),
    (["generate", "--cfg", "-1"], "cfg"),
    (["generate", "--out", "/nonexistent-dir/grid.png"], "cannot write"),
    (["generate", "--model", "{tmp}/corrupt"], "cannot load"),
    (["generate", "--model", "{tmp}/mismatch"], "classes"),
    (["generate", "--model", "{tmp}/badmeta"], "cannot load model"),
    (["generate", "--cfg", "inf"], "finite"),
    (["generate", "--solver", "rk4"], "unknown --solver"),
    (["generate", "--schedule", "cubic"], "unknown --schedule"),
    (["generate", "--labels", "0-999999999"], "more than 100000 classes"),
    (["generate", "--model", "shapes", "--prompt", "a red circle", "--solver", "heun"], "--solver is for"),
    (["generate", "--model", "shapes-ard4", "--prompt", "a red circle", "--schedule", "linear-quadratic"],
     "own noise levels"),
    (["generate", "--model", "shapes", "--prompts", "{tmp}/latin1.txt"], "not UTF-8"),
    (["generate", "--accel", "flexidit"], "exactly one of"),
    (["generate", "--accel", "flexidit:compute=x"], "compute must be a number"),
    (["train", "--out", "{tmp}/afile"], "exists and is not a folder"),
    (["train", "--out", "{tmp}/afile/sub"], "is not a writable folder"),
    (["train", "--out", "{tmp}/t", "--batch-size", "0"], "--batch-size"),
    (["train", "--out", "{tmp}/t", "--lr", "0"], "--lr"),
    (["flexify", "--model", "shapes", "--out", "{tmp}/afile/sub"], "is not a writable folder"),
    (["calibrate", "--model", "digits", "--method", "block-cache", "--delta", "0.5", "--scale-shift",
      "--train-steps", "0", "--out", "{tmp}/p.json"], "--train-steps must be >= 1"),
    (["eval", "--model", "nope"], "unknown model"),
    (["eval", "--steps", "0"], "steps"),
    (["eval", "--cfg", "-2"], "cfg"),
    (["eval", "--samples", "0"], "samples"),
])
def test_bad_input_exits_2_with_one_line(args, match, bad_folders, capsys):
    out = bad_folders / "never.png"
    args = [a.replace("{tmp}", str(bad_folders)) for a in args]
    if args[0] == "generate" and "--out" not in args:
        args += ["--out", str(out)]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(bad_folders.glob(".never.png.*"))  # no temporary file left behind


def test_unwritable_output_leaves_nothing(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions do not bind; use a file-as-folder path
            target = tmp_path / "file.txt"
            target.write_text("x")
            dest = target / "grid.png"
        else:
            dest = ro / "grid.png"
        code, _, err = run_cli(capsys, "generate", "--steps", "1", "--out", str(dest))
        assert code == 2 and err.startswith("error: cannot write")
        assert not dest.exists()
        if dest.parent.is_dir():
            assert not list(dest.parent.glob(".grid.png.*"))  # no temporary file left behind
    finally:
        ro.chmod(0o700)


def test_console_script_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hasten.cli", "generate", "--labels", "99", "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip() == "error: label 99 out of range: this model has classes 0-9"
