"""Nothing is lost on a full disk, a read-only folder or a crash (issue #12, items 5 and 7): images are written to a
temporary file and renamed, outputs are checked before any model loads, conversions never write inside their
source, reuse a killed run's leftover and get the user's usual permissions. Full-disk and read-only cases run
on small tmpfs mounts (root, as in CI)."""

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_hardening_cli import generate, one_line, run

from mlx_flash import files
from mlx_flash.convert import convert
from mlx_flash.image_io import check_writable, save_png


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder; unmounted afterwards."""
    mounts = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"mnt{len(mounts)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Fill a tmpfs until about `leave` bytes are free."""
    stat = os.statvfs(folder)
    (folder / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def noisy_image(side: int = 64) -> Image.Image:
    return Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))  # does not compress


# Images ----------------------------------------------------------------------------------------------------

def test_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    old = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8)), old, {"seed": 1})
    before = old.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*image.png \(No space left on device\); nothing was written"):
        save_png(noisy_image(), old, {"seed": 2}, overwrite=True)
    with pytest.raises(OSError, match="nothing was written"):
        save_png(noisy_image(), tmp_path / "new.png", {"seed": 2})
    assert old.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_png(noisy_image(), tmp_path / "new.png", {"seed": 2})
    assert not list(tmp_path.iterdir())


def test_written_images_have_normal_permissions_and_are_never_replaced_silently(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"seed": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(FileExistsError, match="already exists"):
        save_png(Image.new("RGB", (8, 8)), path, {"seed": 2})


def test_check_writable(tmp_path):
    check_writable([tmp_path / "a.png", tmp_path / "new" / "deeper" / "b.png"])  # folders made later
    assert not list(tmp_path.iterdir())  # the probe leaves nothing
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable([tmp_path / "folder.png"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_writable([tmp_path / "file" / "a.png"])


def test_read_only_output_fails_before_the_model_loads(tmpfs, tmp_path):
    folder = tmpfs("64k")
    read_only(folder)
    # The model does not exist: an error about the output proves the check runs before the model is looked up.
    one_line(generate(tmp_path / "no-such-model", folder / "o.png"), 1, str(folder), "cannot write there",
             "Read-only file system")


def test_full_disk_keeps_the_old_image(tiny_pipeline_dir, tmpfs):
    folder = tmpfs("256k")
    old = folder / "old.png"
    noisy_image(128).save(old)  # an incompressible 48 KB image in place
    before = old.read_bytes()
    fill(folder, 8192)  # room for the probe, not for a new (incompressible) 128x128 image
    result = generate(tiny_pipeline_dir, old, "--force", "--width", "128", "--height", "128")
    one_line(result, 1, "mlx-flash: error: cannot write", "old.png", "No space left on device", "nothing was written")
    assert old.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["filler", "old.png"]


# Conversions -----------------------------------------------------------------------------------------------

def test_conversion_never_writes_inside_its_source(tiny_pipeline_dir, tmp_path):
    before = tree_digest(tiny_pipeline_dir)
    for output in (tiny_pipeline_dir / "transformer", tiny_pipeline_dir / "converted", tiny_pipeline_dir):
        one_line(run("convert", str(tiny_pipeline_dir), str(output), "--force"), 1, "mlx-flash: error: ",
                 "source", "write the conversion to")
    one_line(run("convert", str(tmp_path / "missing.safetensors"), str(tiny_pipeline_dir / "x"),
                 "--base", str(tiny_pipeline_dir)), 1, "inside the source")
    assert tree_digest(tiny_pipeline_dir) == before
    assert not (tiny_pipeline_dir / "converted").exists() and not (tiny_pipeline_dir / "x").exists()


def test_conversion_reuses_a_killed_runs_leftover_and_has_normal_permissions(tiny_pipeline_dir, tmp_path, caplog):
    out = tmp_path / "out"
    leftover = tmp_path / ".out.partial"
    (leftover / "transformer").mkdir(parents=True)
    (leftover / "transformer" / "model.safetensors").write_bytes(b"half written")
    convert(tiny_pipeline_dir, out, dtype="float32", use_t5=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "left by an interrupted conversion" in caplog.text
    mask = os.umask(0)
    os.umask(mask)
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path


def test_conversion_on_a_full_disk_keeps_the_old_output(tiny_pipeline_dir, tmpfs):
    folder = tmpfs("36m")
    out = folder / "out"
    convert(tiny_pipeline_dir, out, dtype="float32", use_t5=False)  # about 23 MB: a second copy does not fit
    before = tree_digest(out)
    result = run("convert", str(tiny_pipeline_dir), str(out), "--dtype", "float32", "--no-t5", "--force")
    one_line(result, 1, f"mlx-flash: error: writing {out} failed", "No space left on device", "nothing was changed")
    assert tree_digest(out) == before and sorted(p.name for p in folder.iterdir()) == ["out"]
