"""BraTS label maps as DICOM Segmentation objects (highdicom), for PACS viewers.

A label map (X, Y, Z) lies on the grid of a DICOM series read by SimpleITK: axis 2 runs over
its files in the reader's order, and the pixel rows of a file are the grid's y axis, its
columns x. The segmentation is BINARY, one segment per tumour label (NCR, ED, ET), each frame
referencing the source image it lies on, so a viewer or a reader puts it back on the series
voxel for voxel.
"""
import numpy as np
import pydicom
from pydicom.sr.coding import Code

from .brats import LABELS

SEGMENT_CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")
SEGMENT_TYPES = {  # label -> the segmented property type's standard code
    1: Code("6574001", "SCT", "Necrosis"),
    2: Code("79654002", "SCT", "Edema"),
    3: Code("C113842", "NCIt", "Enhancing Lesion"),
}


def segment_descriptions(algorithm, version):
    """One highdicom SegmentDescription per tumour label, numbered as the labels."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                                        family=codes.cid7162.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(segment_number=label, segment_label=LABELS[label],
                                      segmented_property_category=SEGMENT_CATEGORY,
                                      segmented_property_type=code,
                                      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm_identification=identification)
            for label, code in SEGMENT_TYPES.items()]


def write_dicom_seg(path, labels, source_files, algorithm, version="1"):
    """Write labels (X, Y, Z), values in LABELS, on the grid of the series `source_files` (one
    file per z, in SimpleITK's order) as a DICOM-SEG at `path`. ValueError when the shapes
    disagree or the files are not single-frame images of one series."""
    import highdicom as hd

    labels = np.asarray(labels)
    sources = [pydicom.dcmread(name) for name in source_files]
    if labels.ndim != 3 or labels.shape[2] != len(sources):
        raise ValueError(f"labels of shape {labels.shape} do not lie on a series of {len(sources)} files")
    for name, ds in zip(source_files, sources):
        if (ds.Rows, ds.Columns) != (labels.shape[1], labels.shape[0]) or int(getattr(ds, "NumberOfFrames", 1)) != 1:
            raise ValueError(f"{name}: a {ds.Rows}x{ds.Columns} image, not a single {labels.shape[1]}x"
                             f"{labels.shape[0]} frame of the labels' grid")
        if ds.SeriesInstanceUID != sources[0].SeriesInstanceUID:
            raise ValueError(f"{name}: not of the series of {source_files[0]}")
    unknown = sorted(set(np.unique(labels).tolist()) - set(LABELS))
    if unknown:
        raise ValueError(f"label values {unknown} are not BraTS labels")
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(np.uint8)  # (Z, rows=Y, columns=X)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(algorithm, version),
        series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="IM-Fuse project",
        manufacturer_model_name=algorithm, software_versions=version, device_serial_number="none",
        series_description=f"{algorithm} tumour segmentation"[:64], omit_empty_frames=False)
    seg.save_as(path)


def read_dicom_seg(path, source_files):
    """The label map (X, Y, Z) uint8 a DICOM-SEG holds on the grid of the series `source_files`
    (SimpleITK's order): each frame put on the file it references."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID for name in source_files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True, dtype=np.uint8)  # (Z, Y, X)
    return np.ascontiguousarray(np.transpose(frames, (2, 1, 0)))
