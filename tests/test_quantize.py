"""The quantize script / `mlximg quantize`: sharded conversion, atomic output, no overwrite without --force (and with
it only of a model folder, never of the source), one run per destination, no complete-looking output after an
interruption and no left-overs after a kill, one-line errors for a full disk; and clear errors for bad FP8
checkpoints."""

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from test_zimage_pipeline import build_reference

from mlximg.loading import load_safetensors, weight_files
from mlximg.models.zimage import load_zimage_transformer
from mlximg.quant import convert as convert_module
from mlximg.quant import destination
from mlximg.quant.convert import convert
from mlximg.quant.options import QuantOptions

INDEX = "diffusion_pytorch_model.safetensors.index.json"
quiet = lambda line: None  # noqa: E731


def shard(component: Path, parts: int = 2) -> None:
    """Split a component's single safetensors file into `parts` shards with an index, as large models ship."""
    (path,) = weight_files(component)
    weights = mx.load(str(path))
    keys = sorted(weights)
    weight_map = {}
    for i in range(parts):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[i::parts]
        mx.save_safetensors(str(component / name), {k: weights[k] for k in chunk})
        weight_map.update({k: name for k in chunk})
    path.unlink()
    (component / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize") / "zimage"
    build_reference(folder)
    shard(folder / "transformer")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sharded_conversion_writes_an_index_and_leaves_the_source_alone(source, tmp_path):
    before = snapshot(source)
    lines = []
    dst = convert(source, tmp_path / "out", log=lines.append)
    assert snapshot(source) == before
    index = json.loads((dst / "transformer" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and all((dst / "transformer" / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(load_safetensors(weight_files(dst / "transformer")))
    assert any("MiB ->" in line for line in lines) and any("reloaded" in line for line in lines)
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"


def test_existing_destination_needs_force(source, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        convert(source, dst, log=quiet)
    # --force replaces only a model folder or an empty folder, not a folder of someone's files.
    with pytest.raises(ValueError, match="refusing to replace .*out: it is not empty and not a model folder"):
        convert(source, dst, force=True, log=quiet)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))


def test_force_replaces_an_earlier_conversion_or_an_empty_folder(source, tmp_path):
    dst = convert(source, tmp_path / "out", log=quiet)
    (dst / "transformer" / "earlier.txt").write_text("from the earlier run")
    (dst / "README.md").write_text("earlier")
    assert convert(source, dst, force=True, log=quiet) == dst
    assert not (dst / "transformer" / "earlier.txt").exists() and not (dst / "README.md").exists()
    assert (dst / "transformer" / INDEX).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert(source, empty, force=True, log=quiet) / "transformer" / INDEX).is_file()
    assert not list(tmp_path.glob(".out.*")) and not list(tmp_path.glob(".empty.*"))


@pytest.mark.parametrize("make, message", [
    (lambda dst, model: dst.write_text("mine"), "refusing to replace .*out: not a folder"),
    (lambda dst, model: (shutil.copytree(model, dst), (dst / "notes.txt").write_text("mine")),
     "refusing to replace .*out: notes.txt is not part of a model folder"),
    (lambda dst, model: (shutil.copytree(model, dst), (dst / "vae").rename(dst / "vae-mine")),
     "refusing to replace .*out: vae-mine is not part of a model folder"),
], ids=["a file", "a model folder with a file of its own", "a model folder with a folder of its own"])
def test_force_refuses_anything_but_a_model_folder(source, quantized, tmp_path, make, message):
    dst = tmp_path / "out"
    make(dst, quantized)
    before = snapshot(dst) if dst.is_dir() else dst.read_bytes()
    with pytest.raises(ValueError, match=message):
        convert(source, dst, force=True, log=quiet)
    assert (snapshot(dst) if dst.is_dir() else dst.read_bytes()) == before
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("target, relation", [
    ("models", "holds the source"),  # the source's parent: --force used to delete it and everything beside it
    (".", "holds the source"),
    ("models/zimage", "is the source"),
    ("models/zimage/transformer", "lies inside the source"),
    ("models/zimage/fp8", "lies inside the source"),
    ("link-to-models", "holds the source"),
    ("models/zimage/transformer/../..", "holds the source"),
])
def test_destination_overlapping_the_source_is_refused(source, tmp_path, target, relation):
    src = tmp_path / "models" / "zimage"
    shutil.copytree(source, src)
    (tmp_path / "models" / "beside.txt").write_text("beside")
    (tmp_path / "link-to-models").symlink_to(tmp_path / "models")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"{relation}; choose a destination outside the source"):
        convert(src, tmp_path / target, force=True, log=quiet)
    assert snapshot(tmp_path) == before


def test_destination_the_source_links_into_is_refused(source, quantized, tmp_path):
    """A source whose vae is a symlink into DST: replacing DST would delete what the source reads."""
    other = tmp_path / "other"
    shutil.copytree(quantized, other)
    src = tmp_path / "src"
    src.mkdir()
    for item in source.iterdir():
        (src / item.name).symlink_to(other / "vae" if item.name == "vae" else item)
    with pytest.raises(ValueError, match=r"holds .*other/vae, which the source .* reaches via .*src/vae"):
        convert(src, other, force=True, log=quiet)
    assert (other / "vae").is_dir()


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    real_write, calls = convert_module.write_shard, []

    def fail_on_second(path, weights, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        real_write(path, weights, metadata)

    monkeypatch.setattr(convert_module, "write_shard", fail_on_second)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, log=quiet)
    assert len(calls) == 2
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))
    # With --force over an earlier conversion, a failure keeps the earlier one.
    monkeypatch.setattr(convert_module, "write_shard", real_write)
    convert(source, dst, log=quiet)
    (dst / "README.md").write_text("earlier")
    before = snapshot(dst)
    monkeypatch.setattr(convert_module, "write_shard", fail_on_second)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, force=True, log=quiet)
    assert snapshot(dst) == before and not list(tmp_path.glob(".out.*"))


def test_script_and_cli(source, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "quantize.py"
    result = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "a")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "transformer:" in result.stdout and "MiB ->" in result.stdout
    again = subprocess.run([sys.executable, "-m", "mlximg", "quantize", str(source), str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    refused = subprocess.run([sys.executable, "-m", "mlximg", "quantize", str(tmp_path / "a"), str(tmp_path / "b")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "already quantized" in refused.stderr


def after_first_shard(monkeypatch, action):
    """Run `action()` once, after the conversion wrote its first shard."""
    real_write, done = convert_module.write_shard, []

    def write(path, weights, metadata):
        real_write(path, weights, metadata)
        if not done:  # marked first: `action` may run a conversion of its own
            done.append(path)
            action()

    monkeypatch.setattr(convert_module, "write_shard", write)


def test_a_second_run_on_the_same_destination_fails_at_once(source, tmp_path, monkeypatch):
    dst, outcome = tmp_path / "out", []

    def second_run():
        try:
            convert(source, dst, log=quiet)
            outcome.append("the second run succeeded")
        except FileExistsError as error:
            outcome.append(str(error))

    after_first_shard(monkeypatch, second_run)
    convert(source, dst, log=quiet)
    assert re.search(rf"out is being written by another conversion \(pid {os.getpid()}, lock .*\.out\.lock\)",
                     outcome[0]), outcome
    assert (dst / "transformer" / INDEX).is_file() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("force, error, message", [
    (False, FileExistsError, "out appeared during the conversion; pass --force"),
    (True, ValueError, "refusing to replace .*out: it is not empty and not a model folder"),
])
def test_a_destination_made_during_the_conversion_is_kept(source, tmp_path, monkeypatch, force, error, message):
    dst = tmp_path / "out"
    after_first_shard(monkeypatch, lambda: (dst.mkdir(), (dst / "theirs.txt").write_text("theirs")))
    with pytest.raises(error, match=message):
        convert(source, dst, force=force, log=quiet)
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"] and (dst / "theirs.txt").read_text() == "theirs"
    assert not list(tmp_path.glob(".out.*"))


def test_the_lock_is_taken_on_the_current_lock_file(source, tmp_path, monkeypatch):
    """The unlink race: the lock file is removed (and made anew) between our open and our flock."""
    dst, lock = tmp_path / "out", tmp_path / ".out.lock"
    real_flock, calls = destination.fcntl.flock, []

    def flock_after_replacement(fd, operation):
        if not calls:
            lock.unlink()
            lock.touch()
        calls.append(fd)
        real_flock(fd, operation)

    def lock_is_held():
        fd = os.open(lock, os.O_RDONLY)
        try:
            real_flock(fd, destination.fcntl.LOCK_EX | destination.fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    monkeypatch.setattr(destination.fcntl, "flock", flock_after_replacement)
    held = []
    after_first_shard(monkeypatch, lambda: held.append(lock_is_held()))
    convert(source, dst, log=quiet)
    assert len(calls) == 2 and held == [True]
    assert not lock.exists()


DRIVER = """
import os, sys, time
from pathlib import Path

import mlximg.cli
from mlximg.quant import convert as convert_module

mode, marker, *argv = sys.argv[1:]
real_write = convert_module.write_shard


def hang(path, weights, metadata):  # one shard written, then wait for the test's signal
    real_write(path, weights, metadata)
    Path(marker).write_text(str(os.getpid()))
    for _ in range(3000):  # short sleeps: a signal that reached another thread runs its handler within 0.1 s
        time.sleep(0.1)


def full(path, weights, metadata):  # the shard goes to /dev/full, where every write fails with ENOSPC
    os.symlink("/dev/full", path)
    real_write(path, weights, metadata)


convert_module.write_shard = {"hang": hang, "full": full}[mode]
sys.exit(mlximg.cli.main(argv))
"""


def driver(tmp_path: Path, mode: str, *argv: str) -> list[str]:
    """The command line of `mlximg ...` in a subprocess whose shard writer is replaced per `mode` (see DRIVER)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return [sys.executable, str(script), mode, str(tmp_path / "ready"), *argv]


def hanging_conversion(source: Path, dst: Path, tmp_path: Path) -> subprocess.Popen:
    """`mlximg quantize` in a subprocess, returned once it wrote a shard into its temporary folder and waits."""
    process = subprocess.Popen(driver(tmp_path, "hang", "quantize", str(source), str(dst)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the conversion never reached its first shard: {process.communicate()}")
        time.sleep(0.05)
    assert len(list(tmp_path.glob(f".{dst.name}.*.tmp"))) == 1
    return process


def signal_state(pid: int) -> str:
    """Each thread's blocked and pending signal masks, to tell why a signal went unhandled."""
    return "\n".join(f"{task.name}: " + " ".join(line for line in (task / "status").read_text().splitlines()
                                              if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigCgt")))
                     for task in Path(f"/proc/{pid}/task").iterdir())


@contextmanager
def sigterm_blocked():
    """This thread blocks SIGTERM, as threads of some servers and frameworks do; processes it starts inherit that."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.mark.parametrize("started_by", ["a plain thread", "a thread blocking SIGTERM"])
def test_sigterm_removes_the_temporary_folder(source, tmp_path, monkeypatch, started_by):
    dst = tmp_path / "out"
    with sigterm_blocked() if "blocking" in started_by else nullcontext():
        process = hanging_conversion(source, dst, tmp_path)
    process.terminate()
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        state = signal_state(process.pid) if sys.platform.startswith("linux") else "?"
        process.kill()
        pytest.fail(f"SIGTERM did not stop the conversion within 60 s; its threads' signals:\n{state}")
    assert process.returncode == 130 and stderr == "mlximg: interrupted\n", stderr
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))
    # In-process, the SIGTERM handler is ours only during the conversion.
    previous, during = signal.getsignal(signal.SIGTERM), []
    after_first_shard(monkeypatch, lambda: during.append(signal.getsignal(signal.SIGTERM)))
    convert(source, tmp_path / "again", log=quiet)
    assert during[0] is not previous and signal.getsignal(signal.SIGTERM) is previous


def test_a_rerun_removes_what_a_killed_run_left(source, tmp_path):
    tmp_path = tmp_path.resolve()  # as the log names it (macOS: /var is a symlink)
    dst = tmp_path / "out"
    process = hanging_conversion(source, dst, tmp_path)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = tmp_path.glob(".out.*.tmp")
    lines = []
    convert(source, dst, log=lines.append)
    assert f"removed stale temporary folder {stale} left by an interrupted run (pid {process.pid})" in lines
    assert (dst / "transformer" / INDEX).is_file() and not list(tmp_path.glob(".out.*"))


def test_a_full_disk_is_an_error_naming_the_space_needed(source, tmp_path, monkeypatch):
    def no_space(path, weights, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(convert_module, "write_shard", no_space)
    folder = re.escape(str(tmp_path.resolve()))
    with pytest.raises(convert_module.NoSpaceError, match=rf"^no space left on device in {folder}: the conversion "
                                                          rf"needs about [\d.]+ MiB, [\d.]+ [MG]iB free$"):
        convert(source, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_through_the_cli_is_one_line(source, tmp_path):
    result = subprocess.run(driver(tmp_path, "full", "quantize", str(source), str(tmp_path / "out")),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(r"mlximg: error: no space left on device in .*: the conversion needs about .*\n",
                        result.stderr), result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_too_little_free_space_is_refused_before_writing(source, tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(convert_module, "write_shard", lambda *args: writes.append(args))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**40, used=2**40, free=1000))
    with pytest.raises(convert_module.NoSpaceError, match=r"^not enough free space in .*: the conversion needs "
                                                          r"about [\d.]+ MiB, 0.0 MiB free$"):
        convert(source, tmp_path / "out", log=quiet)
    assert not writes and not list(tmp_path.iterdir())


def test_the_size_estimate_is_close(source, quantized):
    tree = convert_module.source_tree(source)
    estimate = convert_module.estimate_size(source, tree, {"transformer": convert_module.Quantization()})
    assert abs(estimate / convert_module.folder_size(quantized) - 1) < 0.02


def test_destination_gets_the_usual_permissions(source, tmp_path):
    umask = os.umask(0o022)
    try:
        dst = convert(source, tmp_path / "out", log=quiet)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755


def linked_source(source: Path, folder: Path) -> Path:
    """`source` as the Hugging Face cache lays out a snapshot: symlinks to files, and here a symlinked folder."""
    for path in sorted(source.rglob("*")):
        target = folder / path.relative_to(source)
        if target.relative_to(folder).parts[0] == "vae":
            continue
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    (folder / "vae").symlink_to(source / "vae")
    return folder


def test_a_linked_source_is_copied_as_files(source, tmp_path):
    dst = convert(linked_source(source, tmp_path / "src"), tmp_path / "out", log=quiet)
    assert not [p for p in dst.rglob("*") if p.is_symlink()]
    assert snapshot(dst / "vae") == snapshot(source / "vae")


@pytest.mark.parametrize("link, target, message", [
    ("loop", ".", "a symlink loop: it leads back to"),  # src/loop/loop/... 40 levels deep before
    ("tokenizer/up", "..", "a symlink loop: it leads back to"),
    ("gone", "missing.bin", "a dangling symlink"),
])
def test_bad_symlinks_in_the_source_are_refused(source, tmp_path, monkeypatch, link, target, message):
    src = linked_source(source, tmp_path / "src").resolve()
    (src / link).symlink_to(target)
    writes = []
    monkeypatch.setattr(convert_module, "write_shard", lambda *args: writes.append(args))
    with pytest.raises(ValueError, match=f"^{re.escape(str(src / link))} is {message}"):
        convert(src, tmp_path / "out", log=quiet)
    assert not writes and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("fp8") / "zimage-fp8", log=quiet)


def broken_copy(quantized: Path, tmp_path: Path, config=None, edit=None) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(quantized, folder)
    component = folder / "transformer"
    if config is not None:
        path = component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "quantization": config}))
    if edit is not None:
        for path in weight_files(component):
            weights = dict(mx.load(str(path)))
            if edit(weights):
                mx.save_safetensors(str(path), weights)
    return folder


@pytest.mark.parametrize("config, message", [
    ({"mode": "int3", "bits": 3, "group_size": 32}, "unknown quantization mode 'int3'"),
    ({"mode": "affine", "bits": 8, "group_size": 32}, "affine quantization has group size 64, not 32"),
    ({"bits": 8, "group_size": 32}, "affine quantization has group size 64"),  # mlx-lm's default mode
    ({"mode": "affine", "bits": 3, "group_size": 64}, "affine quantization takes bits 4 or 8, not 3"),
    ({"mode": "mxfp8", "bits": 4, "group_size": 32}, "mxfp8 quantization takes bits 8, not 4"),
    ({"mode": "mxfp8", "bits": 8, "group_size": 64}, "mxfp8 quantization has group size 32, not 64"),
    # A valid mode that the tensors do not hold: the recorded mode disagrees with the checkpoint.
    ({"mode": "nvfp4", "bits": 4, "group_size": 16}, r"scales has shape .* groups of 16 \(nvfp4"),
    ({"mode": "affine", "bits": 8, "group_size": 64}, "must be uint32 codes and float scales and biases"),
])
def test_bad_quantization_config(quantized, tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        load_zimage_transformer(broken_copy(quantized, tmp_path, config=config))


def _drop(key):
    return lambda weights: weights.pop(key, None) is not None


def _regroup(weights):
    """Scales for groups of 64: what a mismatched group size looks like on disk."""
    key = "layers.0.attention.to_q.scales"
    if key not in weights:
        return False
    weights[key] = weights[key][:, ::2]
    return True


def _quantize_final_layer(weights):
    key = "all_final_layer.2-1.linear.weight"
    if key not in weights:
        return False
    weights[key], weights[key.replace(".weight", ".scales")] = mx.quantize(
        weights[key], group_size=32, bits=8, mode="mxfp8")[:2]
    return True


@pytest.mark.parametrize("edit, message", [
    (_drop("layers.0.attention.to_q.scales"), r"layers.0.attention.to_q.weight holds packed mxfp8 codes but "
                                              r"layers.0.attention.to_q.scales is missing"),
    (_regroup, r"layers.0.attention.to_q.scales has shape \(64, 1\), but input width 64 in groups of 32"),
    (_quantize_final_layer, "layer 'all_final_layer.2-1.linear' is quantized, but the policy keeps it"),
])
def test_bad_quantized_weights(quantized, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_zimage_transformer(broken_copy(quantized, tmp_path, edit=edit), fp8=QuantOptions(execution="matmul"))


def test_a_named_model_keeps_its_recipe(source, tmp_path, monkeypatch):
    """The output of `mlximg quantize NAME` runs by NAME's recipe when given by path: the embedded model's
    mlximg.json travels with it, a downloaded model's manifest recipe is written."""
    import mlximg
    from mlximg.manifests import RECIPE_FILE, Manifest, resolve

    digits = convert("z-image-digits", tmp_path / "digits-fp8", log=quiet)
    assert resolve(str(digits)).defaults == resolve("z-image-digits").defaults
    image = mlximg.generate("a handwritten seven", model=str(digits), seed=0)
    assert image.size == (32, 32) and image.info["parameters"]["steps"] == 20

    named = Manifest("tiny-turbo", "zimage", repo="tiny-org/tiny-turbo",
                     defaults={"steps": 3, "guidance": 0.0, "width": 64, "height": 64})
    monkeypatch.setattr(convert_module, "named_manifest", lambda model: named if model == named.repo else None)
    monkeypatch.setattr(convert_module, "resolve_model", lambda *args: source)
    out = convert(named.repo, tmp_path / "turbo-fp8", log=quiet)
    assert json.loads((out / RECIPE_FILE).read_text()) == {"name": "tiny-turbo", "defaults": named.defaults}
    assert resolve(str(out)).defaults == named.defaults


def test_verification_holds_one_tensor_at_a_time(source, tmp_path):
    """The reload check reads the output tensor by tensor: its peak is that of comparing the largest tensor (its
    source and its output, float32), not of the model and its source (a model larger than the machine's memory
    converts too; here the model is 2.3x its largest tensor, so holding both copies would show)."""
    import mlx.core as mx

    from mlximg.quant.format import Quantization

    out = tmp_path / "out"
    convert(source, out, log=quiet)
    weights = load_safetensors(weight_files(source / "transformer"))
    largest = max(v.size for v in weights.values()) * 4
    mx.clear_cache()
    mx.reset_peak_memory()
    convert_module.verify_component(source, out, "transformer", Quantization())
    assert mx.get_peak_memory() < 3 * largest, (mx.get_peak_memory(), largest)


def test_verification_catches_a_wrong_conversion(source, tmp_path, monkeypatch):
    """A conversion whose codes are not the source's (here: every quantized weight negated) is refused and leaves
    no output."""
    from mlximg.quant import format as format_module

    original = format_module.Quantization.quantize
    monkeypatch.setattr(format_module.Quantization, "quantize", lambda self, w: original(self, -w))
    with pytest.raises(ValueError, match="differs from the source by"):
        convert(source, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()
