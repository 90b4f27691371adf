"""Turn a synthetic BraTS-like case into "clinical" inputs, the way real scans differ from
BraTS: other voxel spacings and orientations, DICOM series, patient motion, broken files.

Only SimpleITK and NumPy; callers pass paths (e.g. a case's `<case>-t2f.nii.gz`).

    python tests/clinical_inputs.py     # self-check on a small synthetic case

Conventions: SimpleITK images in and out, physical points in SimpleITK's LPS mm, axes in
SimpleITK order (x, y, z); `sitk.GetArrayFromImage` gives arrays indexed (z, y, x).
"""
import os
import uuid

import numpy as np
import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125."
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"  # SOP Class UID of MR Image Storage
SLICE_SIGMA = 0.4  # Gaussian sigma per mm of new spacing, before downsampling an axis


# ---- Reading ---------------------------------------------------------------------------------
def read(path):
    """The image at path (NIfTI, DICOM file, ...) as a SimpleITK image."""
    return sitk.ReadImage(str(path))


# ---- Helpers ---------------------------------------------------------------------------------
def _direction(image):
    return np.array(image.GetDirection(), float).reshape(3, 3)


def _centre(image):
    """Physical point of the grid centre (continuous index (n - 1) / 2)."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in image.GetSize()]))


def _cast_like(image, pixel_id):
    """image (float) cast to pixel_id; integer types are rounded and clipped to their range."""
    if pixel_id in (sitk.sitkFloat32, sitk.sitkFloat64):
        return sitk.Cast(image, pixel_id)
    array = sitk.GetArrayFromImage(image)
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype
    info = np.iinfo(dtype)
    out = sitk.GetImageFromArray(np.clip(np.rint(array), info.min, info.max).astype(dtype))
    out.CopyInformation(image)
    return out


def corner_points(image):
    """(8, 3) physical points of the outer voxel corners (continuous index -0.5 / n - 0.5)."""
    size = image.GetSize()
    return np.array([image.TransformContinuousIndexToPhysicalPoint(
        [(-0.5 if (k >> a) & 1 == 0 else n - 0.5) for a, n in enumerate(size)]) for k in range(8)])


def orientation(image):
    """Three-letter orientation code of the direction matrix (e.g. 'LPS', 'RPS')."""
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())


# ---- Spacing and orientation -----------------------------------------------------------------
def resample_to_spacing(image, spacing, flip_axes=(), smooth=True, interpolator=sitk.sitkLinear):
    """The same physical region sampled at `spacing` (mm per axis, x y z).

    The new grid is centred on the old one and covers its whole voxel extent
    (size = ceil(n * old spacing / new spacing) per axis). Before downsampling an axis (new
    spacing larger than old) the image is smoothed along that axis only with a Gaussian of
    sigma = 0.4 * new spacing (mm), a model of slice thickness, when `smooth` and the
    interpolator is not nearest-neighbour (label maps are never smoothed).
    `flip_axes`: axes whose direction column is negated, with the origin moved to the other
    end: same physical extent, reversed voxel order and another header orientation (for
    axis 0 of a BraTS image, LPS becomes RPS). The pixel type is kept (integers rounded).
    """
    spacing = np.asarray(spacing, float)
    old_spacing = np.array(image.GetSpacing())
    size = np.array(image.GetSize())
    pixel_id = image.GetPixelID()
    work = sitk.Cast(image, sitk.sitkFloat32)
    if smooth and interpolator != sitk.sitkNearestNeighbor:
        for axis in range(3):
            if spacing[axis] > old_spacing[axis] * (1 + 1e-6):
                gauss = sitk.RecursiveGaussianImageFilter()
                gauss.SetDirection(axis)
                gauss.SetSigma(float(SLICE_SIGMA * spacing[axis]))  # mm (uses image spacing)
                gauss.SetOrder(sitk.RecursiveGaussianImageFilter.ZeroOrder)
                work = gauss.Execute(work)
    new_size = np.ceil(size * old_spacing / spacing - 1e-6).astype(int)
    direction = _direction(image).copy()
    for axis in flip_axes:
        direction[:, axis] *= -1
    origin = _centre(image) - direction @ ((new_size - 1) / 2.0 * spacing)
    out = sitk.Resample(work, [int(n) for n in new_size], sitk.Transform(3, sitk.sitkIdentity),
                        interpolator, origin.tolist(), spacing.tolist(), direction.ravel().tolist(),
                        0.0, sitk.sitkFloat32)
    return _cast_like(out, pixel_id)


# ---- Patient motion --------------------------------------------------------------------------
def rigidly_moved(image, angle_deg, axis, shift_mm):
    """Simulated patient motion: (moved image, T).

    The content is rotated by angle_deg about physical axis `axis` (0, 1, 2 = x, y, z, right-
    handed, in LPS) through the image's physical centre c, then shifted by shift_mm (LPS mm),
    resampled on the SAME grid (linear, 0 outside, same pixel type).

    Convention: T is a sitk.Euler3DTransform centred at c with moved(p) = image(T(p)) for
    every physical point p, i.e. T maps points of `moved` to points of `image` (T is the
    inverse of the content motion; its angle is -angle_deg). Hence sitk.Resample(moved,
    T.GetInverse()) restores `image`, and registering `moved` (moving) to `image` (fixed)
    should ideally estimate T^-1, the Euler transform centred at c whose
    motion_parameters are exactly (angle_deg on `axis`, shift_mm).
    """
    centre = _centre(image)
    angles = np.zeros(3)
    angles[axis] = np.deg2rad(angle_deg)
    motion = sitk.Euler3DTransform(centre.tolist(), *angles.tolist(), [float(s) for s in shift_mm])
    rotation = np.array(motion.GetMatrix()).reshape(3, 3)
    # T = motion^-1: p -> R^T (p - c - s) + c, about the same centre (one axis: angle negated).
    transform = sitk.Euler3DTransform(centre.tolist(), *(-angles).tolist(),
                                      (-rotation.T @ np.asarray(shift_mm, float)).tolist())
    moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, transform, sitk.sitkLinear,
                          0.0, sitk.sitkFloat32)
    return _cast_like(moved, image.GetPixelID()), transform


def motion_parameters(transform):
    """(angles_deg (3,) about x, y, z; translation_mm (3,)) of a rigid Euler transform.

    Reads the transform's own parameters (about its own centre). For T from rigidly_moved,
    motion_parameters(T.GetInverse()) == (angle on the axis, shift_mm), and so should those of
    a registration result (fixed = image, moving = moved) centred at the image centre.
    A generic sitk.Transform holding an Euler3DTransform (e.g. T.GetInverse()) is accepted.
    """
    if not isinstance(transform, sitk.Euler3DTransform):
        transform = sitk.Euler3DTransform(transform)
    angles = np.rad2deg([transform.GetAngleX(), transform.GetAngleY(), transform.GetAngleZ()])
    return angles, np.array(transform.GetTranslation())


# ---- DICOM -----------------------------------------------------------------------------------
def new_uid():
    """A fresh, valid numeric DICOM UID (under 64 characters, no leading zeros)."""
    return UID_ROOT + str(uuid.uuid4().int % 10 ** 30 or 1)


def write_dicom_series(image, folder, description="T2 AX", series_uid=None, study_uid=None):
    """Write a 3-D image as an MR DICOM series of int16 slices folder/IM0001.dcm, ...

    Slices run along image axis 2. Tags: Series / Study / Frame of Reference / SOP Instance
    UIDs (new ones when not given), Series Description, Modality MR, Image Orientation
    Patient from direction columns 0 and 1, per-slice Image Position Patient and Instance
    Number, Slice Thickness and Spacing Between Slices. sitk.ImageSeriesReader reads back the
    same array, spacing, origin and direction when the direction is right-handed
    (det +1, e.g. BraTS's LPS). DICOM cannot store a left-handed direction: such an image
    comes back physically identical but with direction column 2 negated and the slice order
    reversed. Non-int16 images are rounded and clipped to int16. Returns the file paths.
    """
    os.makedirs(folder, exist_ok=True)
    if image.GetPixelID() != sitk.sitkInt16:
        image = _cast_like(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkInt16)
    series_uid = series_uid or new_uid()
    study_uid = study_uid or new_uid()
    frame_uid = new_uid()
    direction = _direction(image)
    spacing = image.GetSpacing()
    series_number = str(int(series_uid.rsplit(".", 1)[-1]) % 9000 + 1)
    common = {
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0016": MR_IMAGE_STORAGE,
        "0008|0020": "20240101", "0008|0030": "120000",
        "0008|0021": "20240101", "0008|0031": "120000",
        "0008|0060": "MR",
        "0008|103e": description,
        "0010|0010": "SYNTHETIC^CASE", "0010|0020": "SYNTH0001",
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": series_number,
        "0020|0052": frame_uid,
        "0020|0037": "\\".join(f"{v:.10g}" for v in
                               np.concatenate([direction[:, 0], direction[:, 1]])),
        "0018|0050": f"{spacing[2]:.10g}",
        "0018|0088": f"{spacing[2]:.10g}",
        "0028|0030": f"{spacing[1]:.10g}\\{spacing[0]:.10g}",  # row spacing \ column spacing
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetSize()[2]):
        slice_image = image[:, :, k]
        for key, value in common.items():
            slice_image.SetMetaData(key, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", new_uid())
        path = os.path.join(str(folder), f"IM{k + 1:04d}.dcm")
        writer.SetFileName(path)
        writer.Execute(slice_image)
        paths.append(path)
    return paths


def read_dicom_series(folder, series_uid=None):
    """The series in folder (the first one GDCM finds when series_uid is None) as one image."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid or ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def corrupt(path, seed=0):
    """Overwrite path with a garbled, truncated copy (first 200 bytes, then random bytes of
    about half the rest) so that it can no longer be read as DICOM."""
    with open(path, "rb") as f:
        data = f.read()
    rng = np.random.default_rng(seed)
    garbage = rng.integers(0, 256, size=max((len(data) - 200) // 2, 64), dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data[:200] + garbage)


# ---- Self-check ------------------------------------------------------------------------------
def _self_check():
    import sys
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data.synthetic import make_cohort

    def same_geometry(a, b, tol=1e-4):
        return (a.GetSize() == b.GetSize()
                and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
                and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
                and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))

    with tempfile.TemporaryDirectory() as tmp:
        case = make_cohort(os.path.join(tmp, "raw"), 1, seed=5, size=(64, 64, 48), workers=1)[0]
        case = str(case)
        t2f = read(os.path.join(case, os.path.basename(case) + "-t2f.nii.gz"))
        seg = read(os.path.join(case, os.path.basename(case) + "-seg.nii.gz"))
        print("t2f", t2f.GetSize(), t2f.GetSpacing(), orientation(t2f), t2f.GetPixelIDTypeAsString())

        # 1. other spacing and orientation
        thick = resample_to_spacing(t2f, (1, 1, 4), flip_axes=(0,))
        box_in, box_out = corner_points(t2f), corner_points(thick)
        extent_err = max(np.abs(box_in.min(0) - box_out.min(0)).max(),
                         np.abs(box_in.max(0) - box_out.max(0)).max())
        print("resampled", thick.GetSize(), thick.GetSpacing(), orientation(thick),
              thick.GetPixelIDTypeAsString(), f"extent error {extent_err:.2e} mm")
        assert thick.GetSize() == (64, 64, 12) and extent_err < 1e-4
        assert orientation(thick) != orientation(t2f) and thick.GetPixelID() == t2f.GetPixelID()
        a, b = sitk.GetArrayFromImage(t2f), sitk.GetArrayFromImage(thick)
        # back on the 1 mm grid: same content, blurred along z
        back = sitk.GetArrayFromImage(sitk.Resample(thick, t2f, sitk.Transform(), sitk.sitkLinear))
        r = np.corrcoef(a.ravel().astype(float), back.ravel().astype(float))[0, 1]
        print(f"  back on the 1 mm grid: correlation {r:.4f}")
        assert r > 0.95
        odd = resample_to_spacing(seg, (1.5, 2.2, 3.0), interpolator=sitk.sitkNearestNeighbor)
        extent_ok = np.all(corner_points(odd).min(0) <= corner_points(seg).min(0) + 1e-6) and \
            np.all(corner_points(odd).max(0) >= corner_points(seg).max(0) - 1e-6)
        print("seg at (1.5, 2.2, 3.0)", odd.GetSize(), odd.GetPixelIDTypeAsString(),
              "labels", np.unique(sitk.GetArrayViewFromImage(odd)).tolist(), "covers input:", extent_ok)
        assert extent_ok and odd.GetPixelID() == sitk.sitkUInt8

        # 2. DICOM round trip
        folder = os.path.join(tmp, "dicom")
        paths = write_dicom_series(t2f, folder)
        dcm = read_dicom_series(folder)
        identical = np.array_equal(sitk.GetArrayFromImage(dcm), a)
        print(f"DICOM: {len(paths)} files, read back {dcm.GetSize()} {dcm.GetPixelIDTypeAsString()},"
              f" array identical {identical}, geometry within 1e-4 {same_geometry(dcm, t2f)}")
        print("  origin", np.round(dcm.GetOrigin(), 6), "direction", np.round(dcm.GetDirection(), 6))
        assert identical and same_geometry(dcm, t2f)
        tags = sitk.ReadImage(paths[3])
        print("  IM0004 tags:", {k: tags.GetMetaData(k).strip() for k in
                                 ("0008|0060", "0008|103e", "0020|0013", "0020|0032", "0020|0037",
                                  "0018|0050")})
        # a non-axis-aligned, anisotropic, thick-slice image also round-trips
        moved_dir = resample_to_spacing(t2f, (0.9, 1.1, 4))
        rot = sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3)
        oblique = sitk.Image(moved_dir)
        oblique.SetDirection((np.array(rot.GetMatrix()).reshape(3, 3) @ _direction(moved_dir)).ravel().tolist())
        folder3 = os.path.join(tmp, "oblique")
        write_dicom_series(oblique, folder3)
        dcm3 = read_dicom_series(folder3)
        ok3 = np.array_equal(sitk.GetArrayFromImage(dcm3), sitk.GetArrayFromImage(oblique)) and \
            same_geometry(dcm3, oblique)
        print(f"DICOM oblique {oblique.GetSize()} {np.round(oblique.GetSpacing(), 3).tolist()}: round trip {ok3}")
        assert ok3
        # left-handed (flipped) image: physically the same, slice order reversed
        folder4 = os.path.join(tmp, "flipped")
        write_dicom_series(thick, folder4)
        dcm4 = read_dicom_series(folder4)
        same_phys = np.array_equal(sitk.GetArrayFromImage(dcm4), b[::-1]) and \
            np.allclose(corner_points(dcm4).min(0), box_out.min(0), atol=1e-4) and \
            np.allclose(corner_points(dcm4).max(0), box_out.max(0), atol=1e-4)
        print(f"DICOM left-handed ({orientation(thick)}) read back as {orientation(dcm4)},"
              f" z reversed, same physical extent: {same_phys}")
        assert same_phys

        # 3. two series in one folder
        folder2 = os.path.join(tmp, "two")
        study = new_uid()
        write_dicom_series(t2f, os.path.join(folder2, "a"), "T2 FLAIR AX", study_uid=study)
        s1 = read(os.path.join(case, os.path.basename(case) + "-t1n.nii.gz"))
        write_dicom_series(s1, os.path.join(folder2, "b"), "T1 AX", study_uid=study)
        for sub in ("a", "b"):
            for name in os.listdir(os.path.join(folder2, sub)):
                os.rename(os.path.join(folder2, sub, name), os.path.join(folder2, f"{sub}_{name}"))
            os.rmdir(os.path.join(folder2, sub))
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder2)
        counts = [len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder2, i)) for i in ids]
        print(f"two series in one folder: {len(ids)} series IDs, files per series {counts}")
        assert len(ids) == 2 and counts == [48, 48]

        # 4. corrupt file
        corrupt(paths[10])
        try:
            sitk.ReadImage(paths[10])
            unreadable = False
        except RuntimeError:
            unreadable = True
        print(f"corrupt IM0011.dcm: {os.path.getsize(paths[10])} bytes, sitk.ReadImage raises: {unreadable};"
              f" GDCM series now lists {len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder))} files")
        assert unreadable

        # 5. patient motion
        moved, T = rigidly_moved(t2f, 5.0, 2, (4.0, 0.0, 0.0))
        inv_angles, inv_shift = motion_parameters(T.GetInverse())
        print("motion: T params", *[np.round(v, 4).tolist() for v in motion_parameters(T)],
              "| T^-1 params", np.round(inv_angles, 4).tolist(), np.round(inv_shift, 4).tolist())
        assert np.allclose(inv_angles, [0, 0, 5]) and np.allclose(inv_shift, [4, 0, 0])
        assert same_geometry(moved, t2f) and moved.GetPixelID() == t2f.GetPixelID()
        p = np.array(t2f.TransformIndexToPhysicalPoint((20, 30, 24)))
        assert np.allclose(T.TransformPoint(T.GetInverse().TransformPoint(p.tolist())), p)
        restored = sitk.GetArrayFromImage(sitk.Resample(moved, t2f, T.GetInverse(), sitk.sitkLinear, 0.0))
        mask = a != 0
        r_restored = np.corrcoef(a[mask].astype(float), restored[mask].astype(float))[0, 1]
        r_moved = np.corrcoef(a[mask].astype(float), sitk.GetArrayFromImage(moved)[mask].astype(float))[0, 1]
        # sanity of the direction: content really moved by +4 mm in physical x (LPS)
        com = lambda img: np.array(img.TransformContinuousIndexToPhysicalPoint(
            np.average(np.indices(img.GetSize()[::-1]).reshape(3, -1)[::-1],
                       axis=1, weights=sitk.GetArrayViewFromImage(img).ravel().astype(float))))
        dcom = com(moved) - com(t2f)
        print(f"  correlation in brain: moved {r_moved:.4f}, restored {r_restored:.4f};"
              f" centre of mass shift {np.round(dcom, 2).tolist()} mm")
        assert r_restored > 0.98 and abs(dcom[0] - 4) < 0.5
    print("all clinical_inputs checks passed")


if __name__ == "__main__":
    _self_check()
