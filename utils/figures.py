"""PNGs: per evaluated case, the ground truth and the prediction of each modality subset over
FLAIR at the axial slice where the reference tumour is largest; per predicted patient, the
prediction over each sequence in three planes through the tumour."""
import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_path

# RGB of labels 1-3 (NCR, ED, ET), drawn with OVERLAY_ALPHA over the grey image
LABEL_COLOURS = np.array([[0, 0, 0], [230, 40, 40], [40, 200, 60], [250, 220, 30]], np.float32)


def tumour_slice(target, labels):
    """The axial index with the most tumour voxels in the reference (or, with no reference
    tumour, in any prediction; the middle slice when there is none at all)."""
    for volume in (target, labels):
        area = (volume > 0).reshape(-1, volume.shape[-1]).sum(0)
        if area.any():
            return int(area.argmax())
    return target.shape[-1] // 2


def _grey(image):
    """Slice -> uint8 RGB, contrast from the 1st-99th percentiles of its non-zero voxels."""
    values = image[image != 0]
    lo, hi = np.percentile(values, (1, 99)) if values.size else (0.0, 1.0)
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.repeat(grey[..., None], 3, axis=-1)


def _panel(grey, label, title, scale, alpha, title_height):
    rgb = np.where(label[..., None] > 0, (1 - alpha) * grey + alpha * LABEL_COLOURS[label], grey)
    # rows anterior to posterior, columns along x: BraTS arrays shown as axial slices
    img = Image.fromarray(rgb.transpose(1, 0, 2).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    panel = Image.new("RGB", (img.width, img.height + title_height))
    panel.paste(img, (0, title_height))
    ImageDraw.Draw(panel).text((2, 1), title, fill=(255, 255, 255))
    return panel


def case_figure(path, flair, target, labels, titles, columns=4, min_width=160, alpha=0.45):
    """PNG of flair (X, Y, Z) with the reference `target` (X, Y, Z) and each prediction of
    `labels` (S, X, Y, Z) (titles: S names) overlaid, one panel each."""
    z = tumour_slice(target, labels)
    grey = _grey(flair[:, :, z].astype(np.float32))
    scale = max(1, -(-min_width // flair.shape[0]))
    panels = [_panel(grey, label[:, :, z].astype(np.int64), title, scale, alpha, 14)
              for label, title in zip([target] + list(labels), ["reference"] + list(titles))]
    w, h = panels[0].size
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (w * min(columns, len(panels)), h * rows))
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * w, (i // columns) * h))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return z


def report_figure(path, images, labels, titles, min_width=160, alpha=0.45):
    """PNG of each image of `images` (S, X, Y, Z), axes pointing right, anterior and superior
    (RAS), with `labels` (X, Y, Z) overlaid: one row per image (titles: S names), the axial,
    coronal and sagittal slices through the centre of the labelled voxels (of the volume when
    there are none). Returns the centre (x, y, z)."""
    voxels = np.argwhere(labels > 0)
    centre = voxels.mean(0).round().astype(int) if len(voxels) else np.array(labels.shape) // 2
    x, y, z = centre

    def views(volume):  # 2-D arrays (columns, rows): left to right, top to bottom
        return [("axial", volume[:, ::-1, z]), ("coronal", volume[:, y, ::-1]), ("sagittal", volume[x, :, ::-1])]

    scale = max(1, -(-min_width // max(labels.shape)))
    rows = []
    for image, title in zip(images, titles):
        panels = [_panel(_grey(grey.astype(np.float32)), label.astype(np.int64), f"{title} {view}", scale, alpha, 14)
                  for (view, grey), (_, label) in zip(views(image), views(labels))]
        rows.append(panels)
    width = max(sum(p.width for p in row) for row in rows)
    height = sum(max(p.height for p in row) for row in rows)
    sheet = Image.new("RGB", (width, height))
    top = 0
    for row in rows:
        left = 0
        for panel in row:
            sheet.paste(panel, (left, top))
            left += panel.width
        top += max(p.height for p in row)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return tuple(int(c) for c in centre)
