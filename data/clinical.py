"""Clinical scans for prediction: sequences of one session on different grids (spacings,
orientations, fields of view), as NIfTI files or DICOM series, optionally moved between
sequences. Every sequence is put into one 1 mm grid aligned with a reference sequence
(physical positions from the headers, optionally corrected by a rigid registration), where the
model runs; its outputs go back into the reference sequence's own grid. SimpleITK does the
reading, registration and resampling; its physical space is LPS, its arrays (Z, Y, X), turned
here into the project's (X, Y, Z) voxel order.
"""
import math
import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from utils.brats import MODALITIES, MODALITY_NAMES

from .preprocessing import CaseError, crop_and_normalize, read_nifti

DEFAULT_REFERENCE = "t1c"  # the reference sequence when present; else the one with the smallest voxels
GRID_SPACING = 1.0  # mm: the models are trained on 1 mm isotropic BraTS data
BACKGROUND_SHARE = 0.3  # a skull-stripped image has at least this share of voxels at its minimum
DESCRIPTION_TAG = "0008|103e"  # DICOM Series Description


@dataclass
class Sequence:
    """One input sequence: its modality index, where it came from and its image (float32)."""
    index: int
    source: str
    kind: str  # "nifti" or "dicom"
    image: sitk.Image
    transform: sitk.Transform = field(default_factory=sitk.Transform)  # reference point -> this image's
    files: tuple = ()  # a DICOM series' files, one per slice along image axis 2

    @property
    def name(self):
        return MODALITY_NAMES[self.index]

    def grid(self):
        """Its source grid, for the report."""
        return {"source": self.source, "format": self.kind, "shape": list(self.image.GetSize()),
                "spacing_mm": [round(s, 4) for s in self.image.GetSpacing()], "orientation": orientation(self.image)}


def orientation(image):
    """The three-letter code of the directions the voxel axes point to, RAS convention (as
    nibabel's aff2axcodes), e.g. 'RAS', 'LPS'."""
    D = np.array(image.GetDirection()).reshape(3, 3) * [[-1], [-1], [1]]  # LPS -> RAS
    letters = (("L", "R"), ("P", "A"), ("I", "S"))
    code = ""
    for column in D.T:
        axis = int(np.abs(column).argmax())
        code += letters[axis][int(column[axis] > 0)]
    return code


def read_sequence(index, path):
    """Sequence of a NIfTI file or a DICOM series folder; CaseError naming it when unreadable."""
    files = ()
    if os.path.isdir(path):
        (image, files), kind = read_dicom_series(path), "dicom"
    elif not os.path.isfile(path):
        raise CaseError(None, path, "missing file")
    else:
        # nibabel's checks first: SimpleITK drops trailing axes of length 1 and reads a
        # truncated file as zeros
        read_nifti(None, path)
        try:
            image, kind = sitk.ReadImage(path), "nifti"
        except RuntimeError as err:
            raise CaseError(None, path, f"unreadable image ({_message(err)})")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(None, path, f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
                                    f"{image.GetNumberOfComponentsPerPixel()} components")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise CaseError(None, path, "NaN or infinite values")
    if values.min() == values.max():
        raise CaseError(None, path, f"no image content (every voxel is {values.flat[0]:g})")
    return Sequence(index, path, kind, image, files=tuple(files))


def _message(err):
    """The last non-empty line of a SimpleITK exception: ITK's own description."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def read_dicom_series(folder):
    """(image, its files in slice order) of the one DICOM series in `folder`; CaseError for a
    file that is not readable DICOM, a folder with no series or with several (listed with their
    descriptions)."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise CaseError(None, folder, "empty folder: no DICOM series")
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    for name in files:
        reader.SetFileName(os.path.join(folder, name))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise CaseError(None, os.path.join(folder, name), "unreadable DICOM file")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if len(ids) != 1:
        series = []
        for uid in ids:
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
            reader.SetFileName(names[0])
            reader.ReadImageInformation()
            text = reader.GetMetaData(DESCRIPTION_TAG).strip() if reader.HasMetaDataKey(DESCRIPTION_TAG) else ""
            series.append(f"'{text or 'no description'}' ({len(names)} files, {uid})")
        raise CaseError(None, folder, f"{len(ids)} DICOM series, give a folder with one: {'; '.join(series)}"
                        if ids else "no DICOM series")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0])
    gaps = _slice_gaps(reader, names)
    if len(gaps) and gaps.max() - gaps.min() > max(0.01 * np.median(gaps), 1e-3):
        raise CaseError(None, folder, f"slices unevenly spaced ({gaps.min():g} to {gaps.max():g} mm apart): "
                                      "a slice missing?")
    series = sitk.ImageSeriesReader()
    series.SetFileNames(names)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # its problems are ours to report, in one line
    try:
        return series.Execute(), names
    except RuntimeError as err:
        raise CaseError(None, folder, f"unreadable DICOM series ({_message(err)})")
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def _slice_gaps(reader, names):
    """The distances between consecutive slices of a series along its normal (mm), from each
    file's Image Position and Orientation (Patient); empty when a file lacks them."""
    position, orientation = "0020|0032", "0020|0037"
    points, cosines = [], None
    for name in names:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey(position) and reader.HasMetaDataKey(orientation)):
            return np.array([])
        points.append([float(v) for v in reader.GetMetaData(position).split("\\")])
        cosines = [float(v) for v in reader.GetMetaData(orientation).split("\\")]
    normal = np.cross(cosines[:3], cosines[3:])
    return np.diff(np.sort(np.array(points) @ normal))


def skull_warning(name, source, values):
    """A warning (text) when fewer than BACKGROUND_SHARE of an image's voxels (`values`) are
    background, within 1 % of the intensity range (minimum to 99th percentile) of its minimum:
    skull-stripped images have a large empty background; else None."""
    low, high = float(values.min()), float(np.percentile(values, 99))
    share = float((values <= low + 0.01 * (high - low)).mean())
    if share >= BACKGROUND_SHARE:
        return None
    return (f"{name} ({source}) does not look skull-stripped ({100 * share:.0f} % of its voxels are background): "
            "the models are trained on skull-stripped BraTS scans and the result may be unreliable")


def choose_reference(sequences, name=None):
    """The reference sequence: the one named (a MODALITIES entry), else T1c when present, else
    the one with the smallest voxels."""
    by_index = {s.index: s for s in sequences}
    if name is not None:
        index = MODALITIES.index(name)
        if index not in by_index:
            raise CaseError(None, "input", f"--reference {name}: no {MODALITY_NAMES[index]} sequence given")
        return by_index[index]
    default = MODALITIES.index(DEFAULT_REFERENCE)
    if default in by_index:
        return by_index[default]
    return min(sequences, key=lambda s: (math.prod(s.image.GetSpacing()), s.index))


def working_grid(reference, spacing=GRID_SPACING):
    """An empty image: the grid of `spacing` mm aligned with the reference and covering the
    same physical box from edge to edge, its axes in BraTS's order (voxel axes pointing left,
    posterior, superior: the reference's axes permuted and flipped to the nearest of those, so a
    sagittal or flipped reference gives the model the axes it was trained on)."""
    D = np.array(reference.GetDirection()).reshape(3, 3)  # columns: the voxel axes in LPS space
    perm = [int(np.abs(D[a]).argmax()) for a in range(3)]  # the voxel axis nearest physical axis a
    if sorted(perm) != [0, 1, 2]:  # an oblique reference at 45 degrees: keep its own order
        perm = [0, 1, 2]
    axes = D[:, perm] * np.sign(D[[0, 1, 2], perm])
    extent = (np.array(reference.GetSize()) * np.array(reference.GetSpacing()))[perm]
    low = (np.array(_corners(reference)) @ axes).min(0)  # the box's low corner along the new axes
    grid = sitk.Image([int(n) for n in np.maximum(np.round(extent / spacing), 1)], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(tuple(axes.ravel()))
    grid.SetOrigin(tuple(axes @ (low + spacing / 2)))
    return grid


def _corners(image):
    size = np.array(image.GetSize())
    return [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in (np.array(bits) * size - 0.5)])
            for bits in np.ndindex(2, 2, 2)]


def overlaps(image, reference, transform=None):
    """Whether the physical box of `image` (mapped by the inverse of `transform`, reference ->
    image) meets the reference's."""
    inverse = transform.GetInverse() if transform is not None else None
    points = [inverse.TransformPoint(p) if inverse else p for p in _corners(image)]
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(p) for p in points])
    lo, hi = index.min(0), index.max(0)
    return bool(np.all(hi > -0.5) and np.all(lo < np.array(reference.GetSize()) - 0.5))


def register(fixed, moving, seed=0):
    """Rigid transform (reference point -> moving point) that aligns `moving` to `fixed` by
    Mattes mutual information (50 bins, a regular quarter of the voxels), starting from the
    headers' positions (identity, rotating about the reference's centre), at half and full
    resolution (smoothed 1 and 0 mm)."""
    initial = sitk.Euler3DTransform()
    initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.25, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-5, numberOfIterations=500,
                                                    relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    return sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))


def motion(transform):
    """(rotation about x, y, z in degrees, translation in mm) of a rigid transform."""
    euler = sitk.Euler3DTransform(transform)
    angles = [math.degrees(a) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ())]
    return angles, list(euler.GetTranslation())


def resample(image, grid, transform=None, nearest=False):
    """`image` sampled at the voxels of `grid` (the point p of grid read at transform(p))."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, grid, transform or sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def to_array(image):
    """SimpleITK image -> numpy (X, Y, Z[, K]) in voxel order."""
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X[, K])
    return np.ascontiguousarray(np.swapaxes(array, 0, 2))


def from_array(array, grid):
    """numpy (X, Y, Z[, K]) -> SimpleITK image on `grid`'s geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.swapaxes(array, 0, 2)), isVector=array.ndim == 4)
    image.CopyInformation(grid)
    return image


def nifti_affine(image):
    """The 4x4 RAS affine (nibabel's convention) of a SimpleITK image's grid."""
    D = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = D * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1, -1, 1, 1]) @ affine


@dataclass
class ClinicalPatient:
    """The sequences in the working grid, preprocessed as training cases are."""
    volume: np.ndarray  # (M, x, y, z) float32, cropped and z-scored; zeros for absent modalities
    mask: tuple  # (M,) bool: the modalities present
    box: list  # crop box [(lo, hi)] per axis in the working grid
    grid: sitk.Image  # the working grid (1 mm, aligned with the reference)
    reference: Sequence
    sequences: list  # Sequence, in MODALITIES order

    def to_reference(self, array, nearest):
        """numpy (X, Y, Z[, K]) on the working grid -> the reference sequence's grid."""
        return to_array(resample(from_array(array, self.grid), self.reference.image, nearest=nearest))


def load_clinical(paths, min_size, reference=None, registration=False, log=lambda line: None):
    """paths: [NIfTI file, DICOM folder or None] per modality -> ClinicalPatient, the working grid
    cropped to at least min_size. reference: a MODALITIES name or None (choose_reference);
    registration: register every other sequence rigidly to the reference (log reports each)."""
    sequences = [read_sequence(k, p) for k, p in enumerate(paths) if p]
    if not sequences:
        raise CaseError(None, "input", "no FLAIR, T1c, T1 or T2 image given")
    ref = choose_reference(sequences, reference)
    for s in sequences:
        if s is not ref and not overlaps(s.image, ref.image):
            raise CaseError(None, s.source, f"{s.name} does not overlap the reference {ref.name} "
                                            f"({ref.source}) in physical space")
    if registration:
        for s in sequences:
            if s is not ref:
                try:
                    s.transform = register(ref.image, s.image)
                except RuntimeError as err:
                    raise CaseError(None, s.source, f"registration of {s.name} to {ref.name} failed ({_message(err)})")
                if not overlaps(s.image, ref.image, s.transform):
                    raise CaseError(None, s.source, f"registered {s.name} does not overlap the reference {ref.name}")
                angles, shift = motion(s.transform)
                log(f"registered {s.name} to {ref.name}: rotation {', '.join(f'{a:+.2f}' for a in angles)} "
                    f"degrees (x, y, z), translation {', '.join(f'{t:+.2f}' for t in shift)} mm")
    grid = working_grid(ref.image)
    images = np.zeros((len(MODALITIES),) + tuple(grid.GetSize()), np.float32)
    for s in sequences:
        images[s.index] = to_array(resample(s.image, grid, s.transform))
    volume, box, present = crop_and_normalize(images, min_size)
    for s in sequences:
        if not present[s.index]:
            raise CaseError(None, s.source, "constant over the brain in the reference's grid: no image content")
    return ClinicalPatient(volume, tuple(p is not None for p in paths), box, grid, ref, sequences)
