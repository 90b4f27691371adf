import nibabel as nib
import numpy as np
import pytest

from data.synthetic import case_name, main, make_case, make_cohort

SIZE = (96, 96, 64)  # cohort fixture: tumours large enough for the contrast checks
SMALL = (64, 64, 48)
SUFFIXES = ("t1n", "t1c", "t2w", "t2f")


def load(folder):
    """{suffix: (array, nibabel image)} of the five files of a case folder."""
    return {s: (np.asanyarray(img.dataobj), img)
            for s in SUFFIXES + ("seg",)
            for img in [nib.load(folder / f"{folder.name}-{s}.nii.gz")]}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Six small cases (seed 0) and their contents."""
    folders = make_cohort(tmp_path_factory.mktemp("cohort"), 6, seed=0, size=SIZE)
    return [(f, load(f)) for f in folders]


def test_layout_dtypes_shapes(cases):
    for index, (folder, files) in enumerate(cases):
        name = f"BraTS-GLI-{index:05d}-000"
        assert folder.name == name == case_name(index)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{name}-{s}.nii.gz" for s in SUFFIXES + ("seg",))
        for suffix, (data, img) in files.items():
            assert data.shape == SIZE
            assert data.dtype == (np.uint8 if suffix == "seg" else np.int16)
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)


def test_affines_identical_and_brats_like(cases):
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, SIZE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    for _, files in cases:
        for _, img in files.values():
            np.testing.assert_array_equal(img.affine, expected)
            assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1


def test_skull_stripped_brain_and_labels(cases):
    for _, files in cases:
        images = np.stack([files[s][0] for s in SUFFIXES])  # (4, X, Y, Z)
        seg = files["seg"][0]
        assert images.min() >= 0
        brain = images.max(0) > 0
        assert np.array_equal(brain, (images > 0).all(0))  # zero outside the brain in every modality
        assert 0.15 < brain.mean() < 0.7
        idx = np.argwhere(brain)
        assert idx.min() >= 3 and (np.array(SIZE) - 1 - idx.max(0)).min() >= 3  # border margin
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        assert {2, 3} <= set(np.unique(seg))
        assert not (seg > 0)[~brain].any()


def test_most_cases_have_all_three_labels(cases):
    assert sum({1, 2, 3} <= set(np.unique(files["seg"][0])) for _, files in cases) >= 4


def test_deterministic_per_seed_and_index(tmp_path):
    a, b = load(make_case(tmp_path / "a", 3, 7, SMALL)), load(make_case(tmp_path / "b", 3, 7, SMALL))
    c = load(make_case(tmp_path / "c", 3, 8, SMALL))
    d = load(make_case(tmp_path / "d", 4, 7, SMALL))
    for s in SUFFIXES + ("seg",):
        assert np.array_equal(a[s][0], b[s][0])
        assert not np.array_equal(a[s][0], c[s][0])
        assert not np.array_equal(a[s][0], d[s][0])


def test_contrast_rules(cases):
    for _, files in cases:
        seg = files["seg"][0]
        img = {s: files[s][0].astype(float) for s in SUFFIXES}
        brain = img["t1n"] > 0
        normal = brain & (seg == 0)
        mean = {s: {r: img[s][m].mean() for r, m in
                    (("normal", normal), ("NCR", seg == 1), ("ED", seg == 2), ("ET", seg == 3))
                    if m.any()} for s in SUFFIXES}
        rel = {s: {r: v / mean[s]["normal"] for r, v in mean[s].items()} for s in SUFFIXES}
        assert rel["t2f"]["ED"] > 1.2 and rel["t2w"]["ED"] > 1.2  # oedema bright on FLAIR and T2
        assert rel["t1c"]["ET"] > 1.4 * rel["t1n"]["ET"]  # enhancement on T1c only
        assert rel["t1c"]["ET"] > 1.1 and rel["t1n"]["ET"] < 1
        if "NCR" in mean["t1c"]:
            assert mean["t1c"]["ET"] > 1.3 * mean["t1c"]["NCR"]  # necrosis dark on T1c ...
        if (seg == 1).sum() >= 100:  # ... also below normal brain unless blurred by the rim
            assert rel["t1c"]["NCR"] < 0.9


def test_tissue_contrasts_in_normal_brain(cases):
    # Without the tissue map, order normal-brain voxels by T2: the brightest are CSF, the darkest WM.
    for _, files in cases:
        seg = files["seg"][0]
        img = {s: files[s][0].astype(float) for s in SUFFIXES}
        normal = (img["t1n"] > 0) & (seg == 0)
        t2 = img["t2w"][normal]
        csf = t2 > np.percentile(t2, 95)
        wm = t2 < np.percentile(t2, 30)
        gm_like = (t2 > np.percentile(t2, 60)) & (t2 < np.percentile(t2, 85))
        assert img["t2f"][normal][csf].mean() < img["t2f"][normal][wm].mean()  # CSF dark on FLAIR
        for s in ("t1n", "t1c"):  # WM brighter than GM/CSF on T1
            assert img[s][normal][wm].mean() > img[s][normal][gm_like].mean() > img[s][normal][csf].mean()


def test_smaller_grid_gives_proportionally_smaller_brain(tmp_path):
    fractions = []
    for size in ((64, 64, 48), (128, 128, 96)):
        files = load(make_case(tmp_path, 0, 0, size))
        brain = np.stack([files[s][0] for s in SUFFIXES]).max(0) > 0
        fractions.append(brain.mean())
    assert fractions[0] == pytest.approx(fractions[1], rel=0.15)


def test_cli_writes_cases_and_overwrites(tmp_path):
    args = ["--out", str(tmp_path), "--cases", "2", "--size", "64", "64", "48"]
    main(args)
    first = load(tmp_path / "BraTS-GLI-00001-000")
    main(args)  # existing output folder and cases: overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    again = load(tmp_path / "BraTS-GLI-00001-000")
    assert all(np.array_equal(first[s][0], again[s][0]) for s in first)


def test_cli_parallel_workers(tmp_path):
    main(["--out", str(tmp_path), "--cases", "2", "--size", "48", "48", "32", "--workers", "2"])
    assert np.array_equal(load(tmp_path / "BraTS-GLI-00001-000")["t2f"][0],
                          load(make_case(tmp_path / "serial", 1, 0, (48, 48, 32)))["t2f"][0])


@pytest.mark.parametrize("argv", [
    ["--cases", "1"],  # --out missing
    ["--out", "x", "--cases", "0"],
    ["--out", "x", "--cases", "1", "--size", "64", "64"],
    ["--out", "x", "--cases", "1", "--size", "64", "64", "8"],
    ["--out", "x", "--cases", "1", "--workers", "0"],
    ["--out", "x", "--cases", "1", "--seed", "-1"],
])
def test_cli_rejects_bad_arguments(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert not any(tmp_path.iterdir())
