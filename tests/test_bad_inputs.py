"""Every bad input of the issue's part 4: exit 2, one stderr line naming it, no traceback, nothing written.

Each case runs `python -m fedepic.simulate` in a subprocess with a scratch output dir and cache
($FEDEPIC_CACHE); the whole tmp dir is listed before and after, so any file a case writes fails it.
The few that need a fault injected (a full disk, an unwritable folder as root) run `main` in-process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = ["config=centralized_mnist", "data.train_per_class=5", "data.test_per_class=5", "data.download=false"]
BACKDOOR = ["attack.data=backdoor"]
FLIP_MAP = ["attack.data=label_flip", "attack.flip=map"]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mnist_copy(tmp: Path, data_root: Path, name: str, damage: Callable[[bytes], bytes]) -> None:
    """tmp/mnist/MNIST/raw: links to the real files, except `name`, which is a damaged copy."""
    raw = tmp / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (data_root / "MNIST" / "raw").iterdir():
        if src.name == name:
            (raw / name).write_bytes(damage(src.read_bytes()))
        else:
            (raw / src.name).symlink_to(src)


def _image_tree(tmp: Path, data_root: Path, bad_name: Optional[str] = None, bad: bytes = b"") -> Path:
    """tmp/images/tiny/{train,test}/{a,b}/: two real CIFAR JPEGs per class, plus one bad file in train/a."""
    tree = tmp / "images" / "tiny"
    sources = sorted((data_root / "cifar10-jpeg" / "train" / "airplane").iterdir())[:2]
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for src in sources:
                _write(tree / split / cls / src.name, src.read_bytes())
    if bad_name:
        _write(tree / "train" / "a" / bad_name, bad)
    return tree


def _jpeg(data_root: Path) -> bytes:
    return sorted((data_root / "cifar10-jpeg" / "train" / "airplane").iterdir())[0].read_bytes()


IMAGEFOLDER = ["data.name=imagefolder", "data.root={tmp}/images", "data.folder=tiny"]
MNIST_ROOT = ["data.root={tmp}/mnist"]
SETUPS: dict[str, Callable[[Path, Path], None]] = {
    "file": lambda t, d: _write(t / "afile", b"x").__class__,
    "dangling": lambda t, d: (t / "gone").symlink_to(t / "nowhere"),
    "non_utf8": lambda t, d: _write(t / "latin1.yaml", "mode: centralized\nname: caf\xe9\n".encode("latin-1")),
    "strategies_map": lambda t, d: _write(t / "smap.yaml", b"mode: federated\nstrategies: {a: 1}\n"),
    "train_scalar": lambda t, d: _write(t / "t5.yaml", b"mode: centralized\ntrain: 5\n"),
    "duplicate": lambda t, d: _write(t / "dup.yaml", b"mode: centralized\nrounds: 2\nmode: federated\n"),
    "duplicate_nested": lambda t, d: _write(t / "dup2.yaml", b"train:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n"),
    "label_sets": lambda t, d: _write(t / "ls.yaml", b"mode: federated\nclients: {count: 2}\ndata:\n  partition: "
                                      b"label_sets\n  label_sets:\n    - {clients: [0, 1], labels: [0, 12]}\n"),
    "mnist_header": lambda t, d: _mnist_copy(t, d, "t10k-labels-idx1-ubyte", lambda b: b"\x00\x00\x09\x01" + b[4:]),
    "mnist_empty": lambda t, d: _mnist_copy(t, d, "train-labels-idx1-ubyte", lambda b: b""),
    "mnist_truncated": lambda t, d: _mnist_copy(t, d, "t10k-images-idx3-ubyte", lambda b: b[: len(b) // 2]),
    "img_text": lambda t, d: _image_tree(t, d, "notes.jpg", b"not an image\n"),
    "img_empty": lambda t, d: _image_tree(t, d, "empty.png", b""),
    "img_truncated": lambda t, d: _image_tree(t, d, "cut.jpg", _jpeg(d)[:300]),
    "img_tree": lambda t, d: _image_tree(t, d),
    "completed_run": lambda t, d: (_write(t / "done" / "config.yaml", b"mode: centralized\n"),
                                   _write(t / "done" / "summary.json", b'{"status": "completed"}')),
    "deep_yaml": lambda t, d: _write(t / "deep.yaml", b"rounds: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    "link_loop": lambda t, d: ((t / "a").symlink_to(t / "b"), (t / "b").symlink_to(t / "a")),
    "img_loop": lambda t, d: (_image_tree(t, d), (t / "images" / "tiny" / "train" / "a" / "x.jpg").symlink_to(
        t / "images" / "tiny" / "train" / "a" / "y.jpg"), (t / "images" / "tiny" / "train" / "a" / "y.jpg").symlink_to(
        t / "images" / "tiny" / "train" / "a" / "x.jpg")),
    "img_folder_loop": lambda t, d: (_image_tree(t, d), (t / "images" / "tiny" / "train" / "a" / "up").symlink_to(
        t / "images" / "tiny", target_is_directory=True)),
    "foreign_checkpoint": lambda t, d: (_write(t / "run" / "config.yaml", b"mode: centralized\n"),
                                        _write(t / "run" / "summary.json", b'{"status": "interrupted"}'),
                                        _write(t / "run" / "checkpoint.pt", _foreign_pickle())),
    "empty_partition": lambda t, d: _empty_partition(t / "empty.npz", 10),
}


def _foreign_pickle() -> bytes:
    import pickle

    class Code:  # what a planted checkpoint would run if it were unpickled
        def __reduce__(self):
            return (os.system, ("echo planted",))

    return pickle.dumps(Code(), protocol=4)


def _empty_partition(path: Path, count: int) -> Path:
    import numpy as np

    np.savez(path, **{f"client_{k}": np.zeros(0, dtype=np.int64) for k in range(count)})
    return path

# (id, setup, args ({tmp} is the scratch dir), needles that the one stderr line must hold, extra env)
CASES = [
    ("output_dir is a file", "file", ["output_dir={tmp}/afile"], ["output_dir", "afile", "not a folder"], {}),
    ("output_dir under a file", "file", ["output_dir={tmp}/afile/runs"], ["output_dir", "under the file"], {}),
    ("output_dir nonexistent root", None, ["output_dir=/nonexistent-fedepic-root/runs"],
     ["output_dir", "/nonexistent-fedepic-root does not exist"], {}),
    ("output_dir dangling link", "dangling", ["output_dir={tmp}/gone"], ["output_dir", "link"], {}),
    ("cache dir is a file", "file", [], ["$FEDEPIC_CACHE", "not a folder"], {"FEDEPIC_CACHE": "{tmp}/afile"}),
    ("data.cache_dir under a file", "file", ["data.cache_dir={tmp}/afile/c"], ["data.cache_dir", "under"], {}),
    ("non-UTF-8 YAML", "non_utf8", ["config={tmp}/latin1.yaml"], ["latin1.yaml", "UTF-8"], {}),
    ("strategies mapping override", None, ["strategies={a:1}"], ["'strategies'", "expected a list"], {}),
    ("strategies mapping in YAML", "strategies_map", ["config={tmp}/smap.yaml"], ["'strategies'", "smap.yaml"], {}),
    ("compare mapping", None, ["defense.compare={a:1}"], ["'defense.compare'", "list"], {}),
    ("scalar for a list item", None, ["attack.flip_map=[1,2]"], ["'attack.flip_map[0]'"], {}),
    ("seed 2**64", None, ["seed=18446744073709551616"], ["'seed'", "18446744073709551616"], {}),
    ("figures.dpi too low", None, ["figures.dpi=20"], ["'figures.dpi'", "20", "[50, 600]"], {}),
    ("figures.vector eps", None, ["figures.vector=eps"], ["'figures.vector'", "'eps'", "pdf, svg"], {}),
    ("figures mapping", None, ["figures=300"], ["'figures'", "mapping"], {}),
    ("seed -1 decentralized", None, ["seed=-1", "mode=decentralized", "strategies=[gossip]"], ["'seed'", "-1"], {}),
    ("train: 5 in YAML", "train_scalar", ["config={tmp}/t5.yaml"], ["'train'", "t5.yaml", "mapping"], {}),
    ("train=5 override", None, ["train=5"], ["'train'", "overrides"], {}),
    ("duplicate YAML key", "duplicate", ["config={tmp}/dup.yaml"], ["duplicate key 'mode'", "dup.yaml", "line 3"], {}),
    ("duplicate nested YAML key", "duplicate_nested", ["config={tmp}/dup2.yaml"], ["'lr'", "dup2.yaml", "line 4"], {}),
    ("MNIST bad header", "mnist_header", MNIST_ROOT, ["t10k-labels-idx1-ubyte", "corrupt", "magic"], {}),
    ("MNIST zero-byte file", "mnist_empty", MNIST_ROOT, ["train-labels-idx1-ubyte", "corrupt", "0 bytes"], {}),
    ("MNIST truncated file", "mnist_truncated", MNIST_ROOT, ["t10k-images-idx3-ubyte", "truncated"], {}),
    ("imagefolder non-image", "img_text", IMAGEFOLDER, ["notes.jpg", "cannot decode"], {}),
    ("imagefolder zero-byte", "img_empty", IMAGEFOLDER, ["empty.png", "empty"], {}),
    ("imagefolder truncated", "img_truncated", IMAGEFOLDER, ["cut.jpg", "truncated"], {}),
    ("flip_map out of range", None, [*FLIP_MAP, "attack.flip_map=[[0,10]]"], ["attack.flip_map", "0..9"], {}),
    ("flip_map negative", None, [*FLIP_MAP, "attack.flip_map=[[-1,3]]"], ["attack.flip_map"], {}),
    ("flip_map not a pair", None, [*FLIP_MAP, "attack.flip_map=[[1]]"], ["attack.flip_map", "[from, to]"], {}),
    ("flip_map class twice", None, [*FLIP_MAP, "attack.flip_map=[[1,2],[1,3]]"], ["attack.flip_map", "twice"], {}),
    ("flip_map after data.classes", None, [*FLIP_MAP, "data.classes=[0,1,2]", "attack.flip_map=[[0,3]]"],
     ["attack.flip_map", "0..2"], {}),
    ("patch_size too large", None, [*BACKDOOR, "attack.patch_size=29"], ["attack.patch_size", "28x28"], {}),
    ("imagefolder patch_size too large", "img_tree", [*IMAGEFOLDER, *BACKDOOR, "attack.patch_size=33"],
     ["attack.patch_size", "32x32"], {}),
    ("an override given twice", None, ["train.lr=0.1", "train.lr=0.2"], ["train.lr", "twice"], {}),
    ("resume of no run folder", None, ["resume={tmp}/nothing"], ["resume", "not a run folder"], {}),
    ("resume of a completed run", "completed_run", ["resume={tmp}/done"], ["resume", "'completed'"], {}),
    ("backdoor_label out of range", None, [*BACKDOOR, "attack.backdoor_label=10"], ["attack.backdoor_label"], {}),
    ("backdoor_label after data.classes", None, [*BACKDOOR, "data.classes=[3,4]", "attack.backdoor_label=2"],
     ["attack.backdoor_label", "0..1"], {}),
    ("data.classes out of range", None, ["data.classes=[0,10]"], ["data.classes", "10"], {}),
    ("cuda:99", None, ["train.device=cuda:99"], ["train.device", "cuda:99"], {}),
    ("duplicate compare", None, ["defense.compare=[none,epic-0.1,none]"], ["defense.compare[2]", "repeats"], {}),
    ("duplicate compare epic spelling", None, ["defense.compare=[epic-0.1,epic-0.10]"], ["defense.compare[1]"], {}),
    ("label_sets label out of range", "label_sets", ["config={tmp}/ls.yaml"], ["data.label_sets[0].labels", "12"],
     {}),
    # the section 4 (every value checked before anything runs)
    ("train.threads negative", None, ["train.threads=-3"], ["train.threads", "-3"], {}),
    ("train.lr inf", None, ["train.lr=inf"], ["train.lr", "finite"], {}),
    ("train.lr 1e309", None, ["train.lr=1e309"], ["train.lr", "finite"], {}),
    ("train.weight_decay inf", None, ["train.weight_decay=inf"], ["train.weight_decay", "finite"], {}),
    ("name of 300 characters", None, ["name=" + "n" * 300], ["'name'", "at most 200 bytes"], {}),
    ("YAML nested 5000 deep", "deep_yaml", ["config={tmp}/deep.yaml"], ["deep.yaml", "too deeply"], {}),
    ("override nested 5000 deep", None, ["rounds=" + "[" * 5000 + "]" * 5000], ["'rounds'"], {}),
    ("config given twice", None, ["config=centralized_mnist", "config=dfl_smoke"], ["'config'", "twice"], {}),
    ("a missing data.root is not created", None, ["data.root={tmp}/new/root"], ["MNIST not found"], {}),
    ("output_dir under a link loop", "link_loop", ["output_dir={tmp}/a/runs"],
     ["output_dir", "Too many levels of symbolic links"], {}),
    ("imagefolder link loop", "img_loop", IMAGEFOLDER, ["x.jpg", "Too many levels of symbolic links"], {}),
    ("imagefolder folder linked inside itself", "img_folder_loop", IMAGEFOLDER, ["up", "loop"], {}),
    ("a foreign checkpoint", "foreign_checkpoint", ["resume={tmp}/run"], ["checkpoint.pt", "not a readable checkpoint (Unsupported"], {}),
    ("a variant's non-finite value", None, ["config=dfl_smoke", "strategies=[v]", "variants={v: {strategy: gossip, "
     "train: {lr: .inf}}}"], ["train.lr", "finite", "variants.v"], {}),
    ("every client of a partition file empty", "empty_partition",
     ["mode=federated", "data.partition=rows", "data.partition_file={tmp}/empty.npz"], ["partition_file", "empty"], {}),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(tmp: Path, data_root: Path, args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDEPIC_DATA": str(data_root), "FEDEPIC_CACHE": str(tmp / "cache"),
           "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO),  # this checkout, not an installed copy
           **{k: v.replace("{tmp}", str(tmp)) for k, v in env_extra.items()}}
    return subprocess.run([sys.executable, "-m", "fedepic.simulate", *_args(tmp, args)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(returncode: int, stderr: str, needles: list[str]) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    assert lines[0].startswith("fedepic: error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


def _args(tmp: Path, args: list[str]) -> list[str]:
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp}/runs")
    if not any(a.startswith(("config=", "resume=")) for a in args):
        args = [*SMALL, *args]
    return args


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, data_root, case, monkeypatch, capsys):
    """In-process ``main`` (the CLI's entry point; an uncaught exception fails the test as a traceback
    would): a subprocess per case cost 2-3 s of interpreter and torch start-up each.
    ``test_the_cli_process_exits_2_with_one_line`` runs the real command."""
    _, setup, args, needles, env_extra = case
    if setup:
        SETUPS[setup](tmp_path, data_root)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDEPIC_DATA", str(data_root))
    monkeypatch.setenv("FEDEPIC_CACHE", str(tmp_path / "cache"))
    for key, value in env_extra.items():
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    code, err = _main(_args(tmp_path, args), capsys)
    assert_one_line(code, err, needles)
    assert _tree(tmp_path) == before, "a failed run wrote files"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("duplicate YAML key", "MNIST truncated file",
                                                               "seed -1 decentralized")], ids=lambda c: c[0])
def test_the_cli_process_exits_2_with_one_line(tmp_path, data_root, case):
    _, setup, args, needles, env_extra = case
    if setup:
        SETUPS[setup](tmp_path, data_root)
    before = _tree(tmp_path)
    proc = _run(tmp_path, data_root, args, env_extra)
    assert_one_line(proc.returncode, proc.stderr, needles)
    assert _tree(tmp_path) == before, "a failed run wrote files"


def test_cuda_without_gpu(tmp_path, data_root):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run(tmp_path, data_root, ["train.device=cuda"], {})
    assert_one_line(proc.returncode, proc.stderr, ["train.device", "CUDA is not available"])
    assert _tree(tmp_path) == set()


def test_cuda_is_not_checked_for_a_ray_cluster():
    from fedepic.config import load_config

    cfg = load_config("server_noniid", ["train.device=cuda:99", "ray.address=auto"])
    assert cfg.train.device == "cuda:99"


# ----------------------------------------------------------------- faults injected in-process


def _main(args: list[str], capsys) -> tuple[int, str]:
    from fedepic.simulate import main

    code = main(args)
    return code, capsys.readouterr().err


def test_unwritable_output_dir(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == out else real_access(p, m))  # root ignores chmod
    code, err = _main([*SMALL, f"output_dir={out}/runs"], capsys)
    assert_one_line(code, err, ["output_dir", "not writable"])
    assert list(out.iterdir()) == []


def test_full_cache_dir_writes_nothing(tmp_path, data_root, monkeypatch, capsys):
    import fedepic.outputs

    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDEPIC_CACHE", str(cache))
    monkeypatch.setenv("FEDEPIC_DATA", str(data_root))
    real_write = fedepic.outputs.atomic_write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        real_write(path, data[:100])  # some bytes land, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("fedepic.data.atomic_write_bytes", full_disk)
    code, err = _main([*SMALL, f"output_dir={tmp_path}/runs"], capsys)
    assert_one_line(code, err, ["decoded cache", "No space left on device"])
    assert not (tmp_path / "runs").exists()
    assert list(cache.iterdir()) == []


def test_full_output_dir_is_one_line(tmp_path, monkeypatch, capsys):
    import pathlib

    out = tmp_path / "runs"
    real_mkdir = pathlib.Path.mkdir

    def full_disk(self: Path, *a, **k) -> None:
        if out in self.parents or self == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", full_disk)
    code, err = _main(["config=centralized_mnist", "data.name=synthetic", "data.synthetic_train=50",
                       "data.synthetic_test=20", "progress=false", f"output_dir={out}"], capsys)
    assert_one_line(code, err, ["cannot write", "No space left on device"])
    assert not out.exists()


def test_missing_parents_of_output_dir_are_allowed(tmp_path):
    from fedepic.config import check_writable_dir

    check_writable_dir("output_dir", tmp_path / "a" / "b" / "runs")  # created when the run starts
    check_writable_dir("output_dir", Path("relative") / "runs")
