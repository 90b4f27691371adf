"""Every entry point against malformed input: checkpoints, NIfTI, npy, split files, metadata and
flags, each variant made from a valid file by a seeded mutation. For every (entry point,
fault): a non-zero exit, one line on stderr that names the file (or flag) and says what is
wrong, no traceback, no advice to unpickle, and nothing written (preprocess.py: the good cases
still written). The scripts run in this process; an exception escaping `main` fails the test
with the traceback a user would have seen. `make test-all` adds a sweep of random bytes and
truncation points (marked slow)."""
import gzip
import io
import json
import os
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from data.patient import modality_files
from data.splits import read_split
from engine.checkpoint import save_checkpoint
from helpers import TINY, TINY_CONFIG, P, script
from models import build_model

TRIED = []  # (entry point, fault) pairs, for the count


@pytest.fixture(scope="module", autouse=True)
def count():
    """Prints (with -s) how many (entry point, fault) pairs the module tried."""
    yield
    print(f"\n{len(TRIED)} (entry point, fault) runs, {len(set(TRIED))} distinct pairs")


@pytest.fixture(scope="module")
def world(tiny_cohort, tmp_path_factory):
    """Valid inputs: the tiny cohort's raw and preprocessed folders (copies), a tiny IM-Fuse
    checkpoint of train_poly.py, an mmFormer one."""
    base = tmp_path_factory.mktemp("fuzz")
    raw, npy = str(base / "raw"), str(base / "npy")
    shutil.copytree(tiny_cohort[0], raw)
    shutil.copytree(tiny_cohort[1], npy)
    torch.manual_seed(0)
    ckpt = str(base / "imfuse.pth")
    model = build_model("imfuse", **TINY_CONFIG)
    optimizer = torch.optim.RAdam(model.parameters())
    save_checkpoint(ckpt, {"model": "imfuse", "config": TINY_CONFIG, "state_dict": model.state_dict(),
                           "optim_dict": optimizer.state_dict(), "epoch": 0, "iteration": 0, "sums": {},
                           "step": 1, "val_Dice_best": 0.0, "seed": 999,
                           "recipe": model.recipe.replace(num_epochs=2, iter_per_epoch=1).as_dict()})
    other = str(base / "mmformer.pth")
    mmformer = build_model("mmformer", patch_size=P)
    save_checkpoint(other, {"model": "mmformer", "config": {"patch_size": P}, "state_dict": mmformer.state_dict()})
    cases = sorted(os.listdir(raw))
    return {"base": base, "raw": raw, "npy": npy, "ckpt": ckpt, "other": other, "case": os.path.join(raw, cases[0]),
            "train": [name for name, _ in read_split(os.path.join(npy, "splits", "train.txt"))],
            "test": [name for name, _ in read_split(os.path.join(npy, "splits", "test15splits.csv"))]}


def run(name, argv, capfd):
    """(exit status, non-empty stderr lines) of a script's main."""
    capfd.readouterr()
    try:
        code = script(name).main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def refused(name, argv, capfd, fault, needles, outputs=()):
    """Assert the one-line refusal; `needles`: text the line must hold (the file, the problem)."""
    TRIED.append((name, fault))
    code, lines = run(name, argv, capfd)
    assert code not in (0, None), f"{name} accepted {fault}"
    assert len(lines) == 1, f"{name}, {fault}: {lines}"
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{name}, {fault}: {needle!r} not in {line!r}"
    assert "Traceback" not in line and "weights_only=False" not in line, line
    for path in outputs:
        assert not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)), f"{name}, {fault}: {path}"
    return line


# --- checkpoints -----------------------------------------------------------------------------

def checkpoint_faults(good, other, rng):
    """{fault: bytes or (writer)} from a valid checkpoint file."""
    data = open(good, "rb").read()
    state = torch.load(good, weights_only=True)
    wrong_zip = io.BytesIO()
    with zipfile.ZipFile(wrong_zip, "w") as z:
        z.writestr("archive/notes.txt", "a zip, not a checkpoint")
    buffers = {}
    for fault, obj in (("non-dict", [1, 2, 3]),
                       ("another model's weights", {**state, "state_dict": torch.load(other, weights_only=True)["state_dict"]}),
                       ("NaN weights", {**state, "state_dict": {k: v.clone().float().fill_(float("nan")) if i == 3 else v
                                                                for i, (k, v) in enumerate(state["state_dict"].items())}}),
                       ("a weight missing", {**state, "state_dict": dict(list(state["state_dict"].items())[1:])}),
                       ("no state_dict", {k: v for k, v in state.items() if k != "state_dict"}),
                       ("model name not a string", {**state, "model": 5}),
                       ("epoch not a number", {**state, "epoch": "3"})):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffers[fault] = buffer.getvalue()
    return {"empty": b"", "text": b"epoch 10, loss 0.3\n", "random bytes": rng.bytes(4096),
            "truncated zip": data[:int(len(data) * rng.uniform(0.3, 0.9))], "zip of other content": wrong_zip.getvalue(),
            **buffers}


CHECKPOINT_PROBLEMS = {"empty": "", "text": "", "random bytes": "", "truncated zip": "", "zip of other content": "",
                       "non-dict": "expected a dict", "another model's weights": "does not fit",
                       "NaN weights": "NaN", "a weight missing": "does not fit", "no state_dict": "state_dict",
                       "model name not a string": "model", "epoch not a number": "epoch"}
for fault in ("empty", "text", "random bytes", "truncated zip", "zip of other content"):
    CHECKPOINT_PROBLEMS[fault] = "not a checkpoint this project can read safely"


def checkpoint_users(world, path, out):
    """(entry point, argv) of every script that reads a checkpoint given as `path`."""
    npy = world["npy"]
    train = ["--datapath", npy, "--num_workers", "0", "--no_progress"]
    return [("test", ["--datapath", npy, "--resume", path, "--savepath", out, "--no_progress"]),
            ("predict", ["--resume", path, "--input", world["case"], "--output", os.path.join(out, "seg.nii.gz"),
                         "--no_progress"]),
            ("train_poly", train + ["--savepath", out, "--resume", path]),
            ("train_poly", train + ["--savepath", out, "--pretrained", path, "--model", "imfuse", *TINY,
                                    "--num_epochs", "1", "--iter_per_epoch", "1"])]


def check_checkpoints(world, tmp_path, capfd, seed):
    rng = np.random.default_rng(seed)
    for fault, data in checkpoint_faults(world["ckpt"], world["other"], rng).items():
        path = tmp_path / f"{fault.replace(' ', '_')}.pth"
        path.write_bytes(data)
        out = tmp_path / "out"
        for name, argv in checkpoint_users(world, str(path), str(out)):
            refused(name, argv, capfd, f"checkpoint: {fault}", [str(path), CHECKPOINT_PROBLEMS[fault]], [out])
    state = torch.load(world["ckpt"], weights_only=True)
    for key in ("seed", "optim_dict", "iteration"):  # what only a resumed run reads
        path = tmp_path / f"no_{key}.pth"
        torch.save({k: v for k, v in state.items() if k != key}, path)
        name, argv = checkpoint_users(world, str(path), str(tmp_path / "out"))[2]
        refused(name, argv, capfd, f"checkpoint: no {key}", [str(path), key, "not a complete"], [tmp_path / "out"])


def seeds(sweep):
    """Seed 0 in `make test`; the sweep's further seeds marked slow."""
    return [0] + [pytest.param(seed, marks=pytest.mark.slow) for seed in range(1, sweep)]


@pytest.mark.parametrize("seed", seeds(21))
def test_checkpoints(world, tmp_path, capfd, seed):
    check_checkpoints(world, tmp_path, capfd, seed)


# --- NIfTI -----------------------------------------------------------------------------------

def nifti_faults(good, rng):
    """{fault: bytes} of .nii.gz files from a valid one."""
    img = nib.load(good)
    data, affine = np.asarray(img.dataobj), img.affine

    def gz(image):
        return gzip.compress(image.to_bytes())

    raw = bytearray(gzip.decompress(open(good, "rb").read()))
    wrong_magic = bytes(raw[:344]) + b"xyz\0" + bytes(raw[348:])
    huge = bytearray(raw)
    huge[42:48] = np.array([4000, 4000, 4000], "<i2").tobytes()  # dim[1..3]: 64e9 voxels declared, the data kept
    floats = data.astype(np.float32)
    nan, inf = floats.copy(), floats.copy()
    nan[tuple(s // 2 for s in data.shape)] = np.nan
    inf[tuple(s // 3 for s in data.shape)] = np.inf
    compressed = open(good, "rb").read()
    return {"empty": b"", "truncated gzip": compressed[:int(len(compressed) * rng.uniform(0.2, 0.9))],
            "wrong magic": gzip.compress(wrong_magic), "2-D": gz(nib.Nifti1Image(data[:, :, 0], affine)),
            "5-D": gz(nib.Nifti1Image(data[..., None, None], affine)), "NaN": gz(nib.Nifti1Image(nan, affine)),
            "inf": gz(nib.Nifti1Image(inf, affine)), "zero-sized axis": gz(nib.Nifti1Image(data[:, :, :0], affine)),
            "huge declared shape": gzip.compress(bytes(huge))}


NIFTI_PROBLEMS = {"empty": "unreadable", "truncated gzip": "unreadable", "wrong magic": "unreadable", "2-D": "3-D",
                  "5-D": "3-D", "NaN": "NaN", "inf": "infinite", "zero-sized axis": "length 0",
                  "huge declared shape": "declares"}


def check_nifti(world, tmp_path, capfd, seed):
    rng = np.random.default_rng(seed)
    files = modality_files(world["case"])
    for fault, data in nifti_faults(files[1], rng).items():  # the T1c
        tag = fault.replace(" ", "_")
        # preprocess.py: a cohort of the case with the faulty T1c and a good case
        raw = tmp_path / f"raw_{tag}"
        bad, good = raw / "BraTS-GLI-90000-000", raw / "BraTS-GLI-90001-000"
        shutil.copytree(world["case"], bad)
        shutil.copytree(world["case"], good)
        for name in os.listdir(bad):
            os.rename(bad / name, bad / name.replace(os.path.basename(world["case"]), bad.name))
            os.rename(good / name, good / name.replace(os.path.basename(world["case"]), good.name))
        t1c = next(bad / n for n in os.listdir(bad) if n.endswith("-t1c.nii.gz"))
        t1c.write_bytes(data)
        out = tmp_path / f"npy_{tag}"
        TRIED.append(("preprocess", f"NIfTI: {fault}"))
        code, lines = run("preprocess", ["--input-path", raw, "--output-path", out, "--min-size", P], capfd)
        failures = [line for line in lines if bad.name in line]
        assert code == 1 and len(failures) == 1 and t1c.name in failures[0], (fault, lines)
        assert NIFTI_PROBLEMS[fault] in failures[0], (fault, failures)
        assert "Traceback" not in "".join(lines)
        written = sorted(os.listdir(out / "vol"))
        assert written == [f"{good.name}_vol.npy"], (fault, written)  # the good case, not the faulty one
        # predict.py, the file given alone and beside a good FLAIR
        single = tmp_path / f"t1c_{tag}.nii.gz"
        single.write_bytes(data)
        # alone, beside a good FLAIR (BraTS-like), and with --register (the clinical path, SimpleITK)
        for argv in (["--t1c", single], ["--flair", files[0], "--t1c", single],
                     ["--flair", files[0], "--t1c", single, "--register"]):
            target = tmp_path / f"pred_{tag}"
            refused("predict", ["--resume", world["ckpt"], *argv, "--output", target / "seg.nii.gz", "--no_progress"],
                    capfd, f"NIfTI: {fault} ({len(argv) // 2} files{', registered' if len(argv) > 4 else ''})",
                    [str(single), NIFTI_PROBLEMS[fault]], [target])


@pytest.mark.parametrize("seed", seeds(11))
def test_nifti(world, tmp_path, capfd, seed):
    check_nifti(world, tmp_path, capfd, seed)


# --- preprocessed arrays, split files, metadata ---------------------------------------------

def dataset_copy(world, tmp_path, tag):
    target = tmp_path / f"npy_{tag}"
    shutil.copytree(world["npy"], target)
    return target


def data_users(world, npy, out, train_file=None, val_file=None, test_file=None):
    train = ["--datapath", npy, "--savepath", out / "run", "--num_workers", "0", "--no_progress", *TINY,
             "--num_epochs", "1", "--iter_per_epoch", "1"]
    return [("train_poly", train + (["--train_file", train_file] if train_file else [])
             + (["--val_file", val_file] if val_file else [])),
            ("test", ["--datapath", npy, "--resume", world["ckpt"], "--savepath", out / "eval", "--no_progress"]
             + (["--test_file", test_file] if test_file else []))]


def test_npy_arrays(world, tmp_path, capfd):
    rng = np.random.default_rng(0)
    for fault in ("truncated", "wrong dtype", "wrong shape", "object array"):
        npy = dataset_copy(world, tmp_path, fault.replace(" ", "_"))
        for name, argv in data_users(world, npy, tmp_path / fault.replace(" ", "_")):
            case = world["train"][0] if name == "train_poly" else world["test"][0]
            path = npy / "vol" / f"{case}_vol.npy"
            vol = np.load(path)
            if fault == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[:int(len(data) * rng.uniform(0.2, 0.9))])
            elif fault == "wrong dtype":
                np.save(path, vol.astype(np.complex64))
            elif fault == "wrong shape":
                np.save(path, vol[..., 0])
            else:
                np.save(path, np.array([{"payload": "unpickled"}] * 3, dtype=object), allow_pickle=True)
            problem = {"truncated": "truncated", "wrong dtype": "complex64", "wrong shape": "shapes",
                       "object array": "unreadable"}[fault]
            refused(name, argv, capfd, f"npy: {fault}", [str(path), problem], [tmp_path / fault.replace(" ", "_")])
            np.save(path, vol)


def split_faults(world):
    case = world["test"][0]
    return {"empty": "", "binary": bytes(range(256)) * 4, "unknown case": "BraTS-GLI-99999-000\n",
            "bad mask": f"case,mask\n{case},maybe\n", "duplicate case": f"case,mask\n{case},1111\n{case},1000\n"}


SPLIT_PROBLEMS = {"empty": "no case in it", "binary": "not a text file", "unknown case": "BraTS-GLI-99999-000",
                  "bad mask": "maybe", "duplicate case": "twice"}


def test_split_files(world, tmp_path, capfd):
    for fault, text in split_faults(world).items():
        tag = fault.replace(" ", "_")
        path = tmp_path / f"{tag}.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for role in ("train_file", "val_file", "test_file"):
            users = data_users(world, world["npy"], tmp_path / f"{tag}_{role}", **{role: path})
            name, argv = users[1] if role == "test_file" else users[0]
            refused(name, argv, capfd, f"split ({role}): {fault}", [str(path), SPLIT_PROBLEMS[fault]],
                    [tmp_path / f"{tag}_{role}"])


def test_metadata(world, tmp_path, capfd):
    for fault, change in (("truncated", lambda text: text[:len(text) // 2]),
                          ("wrong types", lambda text: json.dumps({**json.loads(text), "present": "yes", "crop_box": 3})),
                          ("a key missing", lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                                     if k != "spacing"})),
                          ("not an object", lambda text: "[1, 2]")):
        tag = fault.replace(" ", "_")
        npy = dataset_copy(world, tmp_path, tag)
        for name, argv in data_users(world, npy, tmp_path / tag):
            case = world["train"][-1] if name == "train_poly" else world["test"][-1]  # the last: nothing before
            path = npy / "meta" / f"{case}.json"
            good = path.read_text()
            path.write_text(change(good))
            refused(name, argv, capfd, f"metadata: {fault}", [str(path), "metadata"], [tmp_path / tag])
            path.write_text(good)


# --- test.py outputs for compare.py, pickled checkpoints for engine.convert -------------------

def test_compare_inputs(tmp_path, capfd):
    good = "case,subset,mask,WT,TC,ET,ETpp,HD95_WT,HD95_TC,HD95_ET\nA,T2,[False],0.5,0.4,0.3,0.3,4,5,6\n"
    faults = {"truncated run.json": ('{"model": "imf', good), "run.json not an object": ("[1, 2]", good),
              "binary results.csv": ('{"model": "x"}', bytes(range(256))),
              "results.csv without columns": ('{"model": "x"}', "a,b\n1,2\n"),
              "non-numeric Dice": ('{"model": "x"}', good.replace("0.5", "high")),
              "NaN Dice": ('{"model": "x"}', good.replace("0.5", "nan")),
              "empty Dice cell": ('{"model": "x"}', good.replace(",0.4,", ",,")),
              "short row": ('{"model": "x"}', good.replace(",4,5,6", "")),
              "infinite HD95": ('{"model": "x"}', good.replace(",4,", ",inf,")),
              "repeated row": ('{"model": "x"}', good + good.splitlines()[1] + "\n"),
              "no Dice column": ('{"model": "x"}', good.replace("ETpp", "ETxx")),
              "parameters not a number": ('{"model": "x", "parameters": "many"}', good)}
    where = {"non-numeric Dice": ["results.csv: row 2 (case A, subset T2), column WT", "not a number"],
             "NaN Dice": ["row 2", "column WT", "not a Dice"], "empty Dice cell": ["row 2", "column TC: empty"],
             "short row": ["row 2", "column HD95_WT: empty"], "infinite HD95": ["column HD95_WT", "not a finite"],
             "repeated row": ["row 3", "repeats row 2"], "no Dice column": ["results.csv: no column ETpp"]}
    for fault, (info, rows) in faults.items():
        run = tmp_path / fault.replace(" ", "_")
        run.mkdir()
        (run / "run.json").write_text(info)
        (run / "results.csv").write_bytes(rows if isinstance(rows, bytes) else rows.encode())
        refused("compare", ["--results", run, "--savepath", tmp_path / "cmp"], capfd, f"test.py output: {fault}",
                [str(run)] + where.get(fault, []), [tmp_path / "cmp"])


def test_convert_inputs(world, tmp_path, capfd):
    from engine.convert import main as convert
    rng = np.random.default_rng(0)
    for fault, data in (("empty", b""), ("text", b"weights\n"), ("random bytes", rng.bytes(2048)),
                        ("truncated", open(world["ckpt"], "rb").read()[:3000])):
        path = tmp_path / f"{fault.replace(' ', '_')}.pth"
        path.write_bytes(data)
        TRIED.append(("engine.convert", fault))
        capfd.readouterr()
        code = convert([str(path), str(tmp_path / "out.pth"), "--trust_pickled_code"])
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and str(path) in lines[0], (fault, lines)
        assert not (tmp_path / "out.pth").exists()


# --- flags -----------------------------------------------------------------------------------

def test_flags(world, tmp_path, capfd):
    npy, ckpt, case = world["npy"], world["ckpt"], world["case"]
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    unwritable = blocker / "out"
    train = ["--datapath", npy, "--savepath", tmp_path / "run", "--num_workers", "0", "--no_progress", *TINY,
             "--num_epochs", "1", "--iter_per_epoch", "1"]
    test = ["--datapath", npy, "--resume", ckpt, "--savepath", tmp_path / "eval", "--no_progress"]
    predict = ["--resume", ckpt, "--input", case, "--output", tmp_path / "pred" / "seg.nii.gz", "--no_progress"]
    prep = ["--input-path", world["raw"], "--output-path", tmp_path / "prep"]
    cases = [("train_poly", train + ["--batch_size", "0"], "--batch_size"),
             ("train_poly", train + ["--num_epochs", "-1"], "--num_epochs"),
             ("train_poly", train + ["--iter_per_epoch", "0"], "--iter_per_epoch"),
             ("train_poly", train[:-2] + ["--lr", "-1"], "--lr"),
             ("train_poly", train + ["--val_every", "0"], "--val_every"),
             ("train_poly", train + ["--num_workers", "-1"], "--num_workers"),
             ("train_poly", [a if a != str(P) else "0" for a in train], "--patch_size"),
             ("train_poly", ["--datapath", tmp_path / "nowhere"] + train[2:], "nowhere"),
             ("train_poly", ["--savepath", unwritable] + train[:2] + train[4:], str(unwritable)),
             ("test", test + ["--batch_size", "0"], "--batch_size"),
             ("test", ["--datapath", tmp_path / "nowhere"] + test[2:], "nowhere"),
             ("test", test[:4] + ["--savepath", unwritable, "--no_progress"], str(unwritable)),
             ("predict", predict + ["--batch_size", "-2"], "--batch_size"),
             ("predict", predict[:2] + ["--input", tmp_path / "nowhere"] + predict[4:], "nowhere"),
             ("predict", predict[:4] + ["--output", unwritable / "seg.nii.gz", "--no_progress"], str(unwritable)),
             ("preprocess", prep + ["--min-size", "0"], "--min-size"),
             ("preprocess", prep + ["--workers", "-1"], "--workers"),
             ("preprocess", ["--input-path", tmp_path / "nowhere", "--output-path", tmp_path / "prep"], "nowhere"),
             ("preprocess", prep[:2] + ["--output-path", unwritable], str(unwritable)),
             ("compare", ["--results", tmp_path / "nowhere", "--savepath", tmp_path / "cmp"], "nowhere"),
             ("compare", ["--results", tmp_path / "eval", "--savepath", tmp_path / "cmp", "--resamples", "0"],
              "--resamples")]
    for name, argv, needle in cases:
        refused(name, argv, capfd, f"flag: {needle}", [needle],
                [tmp_path / d for d in ("run", "eval", "pred", "prep", "cmp")])
    from data.synthetic import main as synthetic
    for argv, needle in ((["--out", tmp_path / "syn", "--cases", "0"], "--cases"),
                         (["--out", tmp_path / "syn", "--cases", "1", "--size", "8", "8", "8"], "--size"),
                         (["--out", unwritable, "--cases", "1"], str(unwritable))):
        TRIED.append(("data.synthetic", f"flag: {needle}"))
        capfd.readouterr()
        with pytest.raises(SystemExit) as stop:
            synthetic([str(a) for a in argv])
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "syn").exists()

