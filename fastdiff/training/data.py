"""Datasets for training: scikit-learn's 8x8 handwritten digits (the built-in small real dataset) and any folder
of images. Items are (image, label): image a float32 (C, H, W) tensor in [-1, 1], label an int (-1: unlabelled).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory: (N, C, H, W) in [-1, 1] and (N,) long labels (-1 where unlabelled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, class_names=None):
        if images.dim() != 4:
            raise ValueError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
        self.images = images.float().contiguous()
        self.labels = (torch.full((len(images),), -1, dtype=torch.long) if labels is None
                       else torch.as_tensor(labels, dtype=torch.long))
        if self.labels.shape != (len(images),):
            raise ValueError(f"labels: expected shape ({len(images)},), got {tuple(self.labels.shape)}")
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) and self.labels.min() >= 0 else 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def batch(self, indices: torch.Tensor):
        """A whole batch by index, without the per-item Python loop."""
        return self.images[indices], self.labels[indices]


DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split_indices(n: int = 1797, split: str = "train") -> torch.Tensor:
    """The fixed train / test split of the digits: a permutation seeded by DIGITS_SPLIT_SEED, its first 20%
    (359 images) held out as "test", the rest (1,438) "train"."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    if split == "test":
        return perm[:n_test].sort().values
    if split == "train":
        return perm[n_test:].sort().values
    raise ValueError(f"split: expected 'train' or 'test', got {split!r}")


def digits(image_size: int = 16, split: str | None = None) -> TensorImageDataset:
    """scikit-learn's handwritten digits (1,797 8x8 greyscale images, classes 0-9), bilinearly resized to
    image_size, as (1, image_size, image_size) images in [-1, 1]. Needs scikit-learn (the data ships inside it,
    no download). split: None (all), "train" or "test" (the fixed split of :func:`digits_split_indices`)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'fastdiff[train]')") from e
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.as_tensor(d.target, dtype=torch.long)
    if split is not None:
        idx = digits_split_indices(len(x), split)
        x, y = x[idx], y[idx]
    return TensorImageDataset(x * 2 - 1, y, class_names=[str(i) for i in range(10)])


def _hidden(name: str) -> bool:
    # dotfiles and dot-folders (.DS_Store, macOS's "._name.png" AppleDouble companions, .thumbnails, .git)
    # and the __MACOSX folder a zip made on a Mac unpacks: not the dataset's images, often not images at all
    return name.startswith(".") or name == "__MACOSX"


def _load_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # a camera's EXIF orientation: the image as viewers show it
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                # 16-bit greyscale: convert("L") would clip at 255 (all above 1/256 of full scale white)
                im = im.convert("I").point(lambda v: v * (1 / 257))
            im = im.convert("L" if channels == 1 else "RGB")
            # ADM's centre crop: shrink (box filter) while the short side is >= 2x the target, then resize
            # and crop
            while min(im.size) >= 2 * image_size:
                im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
            scale = image_size / min(im.size)
            im = im.resize(tuple(max(image_size, round(s * scale)) for s in im.size), resample=Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    # PIL's UnidentifiedImageError (not an image), truncated data, bad headers, oversized images: one line
    # naming the file, not a traceback from inside PIL
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"dataset: cannot read the image {path!r}: {e} (remove or replace the file)") from e
    x = data.reshape(image_size, image_size, channels).permute(2, 0, 1).float()
    return x / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """Any folder of images (searched recursively, following symlinked folders; hidden files and folders and
    ``__MACOSX`` skipped), centre-cropped and resized to image_size x image_size.

    Labels come from the first-level subfolder names (sorted, numbered from 0) when every image lies in one;
    otherwise the images are unlabelled (label -1); a class folder without images is an error. channels: 3
    (RGB) or 1 (greyscale), whatever the files hold (alpha dropped, palettes expanded, 16-bit greyscale scaled
    to 8 bits, EXIF orientation applied). Images are read from disk and decoded each time a batch needs them:
    nothing is held in memory, and a file that cannot be read raises ValueError naming it when first drawn.
    """

    def __init__(self, root: str, image_size: int, channels: int = 3):
        try:
            import PIL  # noqa: F401
        except ImportError as e:
            raise ImportError("image folders need Pillow: pip install pillow (or pip install 'fastdiff[train]')") from e
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset: {root!r} is not a directory")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.root, self.image_size, self.channels = root, image_size, channels
        files = []
        # symlinked folders are followed (a dataset assembled from links to class folders), except a link back
        # to a folder above it, which would loop
        for d, subdirs, names in os.walk(root, followlinks=True):
            real, up = os.path.realpath(d), d
            while os.path.normpath(up) != os.path.normpath(root):
                up = os.path.dirname(up)
                if os.path.realpath(up) == real:
                    subdirs[:], names = [], []
                    break
            subdirs[:] = sorted(n for n in subdirs if not _hidden(n))
            files += [os.path.join(d, n) for n in sorted(names)
                      if not _hidden(n) and n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ValueError(f"dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        rel = [os.path.relpath(f, root) for f in files]
        if all(os.sep in r for r in rel):
            top = [r.split(os.sep, 1)[0] for r in rel]
            folders = sorted(n for n in os.listdir(root)
                             if not _hidden(n) and os.path.isdir(os.path.join(root, n)))
            empty = sorted(set(folders) - set(top))
            if empty:  # skipping it would renumber the classes after it once it gets images
                raise ValueError(f"dataset: the class folder {os.path.join(root, empty[0])!r} holds no "
                                 f"images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
            self.class_names = sorted(set(top))
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = torch.tensor([index[c] for c in top], dtype=torch.long)
            self.num_classes = len(self.class_names)
        else:
            self.class_names = None
            self.labels = torch.full((len(files),), -1, dtype=torch.long)
            self.num_classes = 0
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _load_image(self.files[i], self.image_size, self.channels), int(self.labels[i])


def load_dataset(spec: str, image_size: int, channels: int | None = None):
    """"digits", "digits:train", "digits:test" (the fixed split) or the path of a folder of images."""
    if spec in ("digits", "digits:train", "digits:test"):
        if channels not in (None, 1):
            raise ValueError(f"channels: the digits are greyscale (1 channel), got {channels}")
        return digits(image_size, split=spec.split(":")[1] if ":" in spec else None)
    return ImageFolder(spec, image_size, channels or 3)


def fetch(dataset, indices: torch.Tensor):
    """(images, labels) of the given indices: vectorised for in-memory datasets, item by item otherwise."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    images, labels = [], []
    for i in indices:
        item = dataset[int(i)]
        if isinstance(item, (tuple, list)) and len(item) in (1, 2):
            im, lb = item[0], (item[1] if len(item) == 2 else 0)
        elif isinstance(item, (tuple, list)) or item is None:
            raise ValueError(f"dataset: item {int(i)} is a {type(item).__name__} of {len(item) if item else 0}; "
                             f"expected an image, (image,) or (image, label)")
        else:  # an image alone (torch.utils.data.TensorDataset(images) gives (image,)): no label, 0
            im, lb = item, 0
        images.append(torch.as_tensor(im))
        labels.append(int(lb))
    return torch.stack(images), torch.tensor(labels)
