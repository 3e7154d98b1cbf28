"""Input pipeline: random-access sources, model-matched preprocessing, a host-side loader.

Sources are indexable (``len``, ``[i] -> (image HWC uint8, label)``): scikit-learn's
digits (in memory), tfds ArrayRecord data sources (no TensorFlow needed), and a
folder of images with one sub-folder per class. The loader is index-based: the
order of epoch ``e`` is a pure function of (seed, e), and each example's
augmentation of (seed, e, index), so a resumed run sees exactly the batches an
uninterrupted one would, whatever the thread scheduling. Each host reads only its
rows of every global batch.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from typing import Iterator, Optional

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- sources

class ArraySource:
  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, class_names=None):
    self.images, self.labels, self.num_classes = images, labels.astype(np.int32), num_classes
    self.class_names = list(class_names) if class_names is not None else None

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return self.images[i], int(self.labels[i])


def digits(split: str, val_fraction: float = 0.2) -> ArraySource:
  """The 1,797 real 8x8 handwritten digits shipped with scikit-learn (offline).

  A fixed (seed 0) stratified-by-shuffle split: the last ``val_fraction`` is validation.
  """
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..255, HW1
  perm = np.random.default_rng(0).permutation(len(images))
  n_val = int(round(len(images) * val_fraction))
  idx = {"train": perm[:-n_val], "validation": perm[-n_val:]}.get(split)
  if idx is None:
    raise DataError(f"digits has splits 'train' and 'validation', not {split!r}")
  return ArraySource(images[idx], d.target[idx], 10, [str(c) for c in d.target_names])


class TfdsSource:
  """A prepared tfds dataset read through its ArrayRecord data source."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None, prepare: bool = False,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds
    try:
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # unprepared, or prepared without random access (TFRecord)
      builder = tfds.builder(name, data_dir=data_dir)
      if builder.is_prepared() and "split" in str(e).lower():
        raise DataError(f"{name} has no split {split!r}: {str(e).splitlines()[0]}; "
                        f"it has {list(builder.info.splits)}") from None
      if builder.is_prepared():
        raise DataError(
            f"{name} is prepared at {builder.data_dir} in a format without random access "
            f"({type(e).__name__}). Re-prepare it as ArrayRecord:\n  tfds build {name} "
            f"--file_format=array_record" +
            (f" --data_dir={data_dir}" if data_dir else "")) from None
      if not prepare:  # tfds would silently start a download: only when asked for
        raise DataError(_prepare_instructions(name, builder)) from None
      builder.download_and_prepare(file_format="array_record")
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    builder = tfds.builder(name, data_dir=data_dir)
    self.num_classes = builder.info.features[label_key].num_classes
    self.class_names = list(builder.info.features[label_key].names)
    self.image_key, self.label_key = image_key, label_key

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    ex = self.ds[int(i)]
    return ex[self.image_key], int(ex[self.label_key])


def _prepare_instructions(name, builder) -> str:
  where = os.path.dirname(os.path.dirname(builder.data_dir))
  msg = [f"dataset {name!r} is not prepared under {where}."]
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    manual_dir = os.path.join(where, "downloads", "manual")
    msg += [
        f"It needs a manual download. Put the files in {manual_dir}:",
        "  " + " ".join(manual.split()),
        "then prepare it (needs `pip install tensorflow` once, for preparation only):",
        f"  tfds build {name} --file_format=array_record --data_dir={where} "
        f"--manual_dir={manual_dir}"
    ]
  else:
    msg += ["Prepare it once (needs `pip install tensorflow` for preparation only):",
            f"  tfds build {name} --file_format=array_record --data_dir={where}",
            "or let lsvit download and prepare it: --config.data.prepare=True"]
  return "\n".join(msg)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


class FolderSource:
  """``root/<split>/<class name>/<image>``; classes: the sorted sub-folders of the train split."""

  def __init__(self, root: str, split: str, classes=None):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise DataError(
          f"image folder {split_dir} not found: expected {root}/{split}/<class>/<image files>")
    self.classes = classes or sorted(d for d in os.listdir(split_dir)
                                     if os.path.isdir(os.path.join(split_dir, d)))
    self.items = []
    empty = []
    for label, c in enumerate(self.classes):
      cdir = os.path.join(split_dir, c)
      if not os.path.isdir(cdir):
        continue
      found = [(os.path.join(cdir, f), label) for f in sorted(os.listdir(cdir))
               if f.lower().endswith(IMAGE_EXTENSIONS)]
      if not found:
        empty.append(cdir)
      self.items += found
    if not self.items:
      raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/")
    if empty and classes is None:  # a class without images cannot be learnt or scored
      raise DataError(f"class folder {empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                      + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                      + "; add images or remove the folder")
    self.num_classes = len(self.classes)
    self.class_names = list(self.classes)

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    from PIL import Image
    path, label = self.items[int(i)]
    try:
      with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), label
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"cannot read image {path}: {e}; replace or remove the file") from None


def get_source(data_cfg, split: str):
  name = data_cfg.name
  if name == "digits":
    return digits(split)
  if name == "folder":
    train = FolderSource(data_cfg.dir, data_cfg.train_split)
    return train if split == data_cfg.train_split else FolderSource(data_cfg.dir, split,
                                                                    train.classes)
  return TfdsSource(name, split, data_cfg.get("data_dir") or None, data_cfg.get("prepare", False))


# ----------------------------------------------------------------------------- preprocessing

KINDS = ("vit", "deit", "plain", "vit_center", "deit_center")


class Preprocess:
  """Matches the source model's processor.

  'vit':  resize to image_size (bilinear), mean = std = 0.5 (google/vit-*).
  'deit': resize to 256/224 * image_size (bicubic), center crop, ImageNet mean/std
          (facebook/deit-*).
  'plain': resize only if needed, mean = std = 0.5 (digits, data at model size).
  'vit_center' / 'deit_center': the shorter side resized to image_size (bilinear), then the
          centre crop, with the ViT / ImageNet mean and std (the authors' preprocessing).
  Training augmentation (``augment``): random-resized crop then horizontal flip.
  """

  def __init__(self, kind: str, image_size: int, channels: int = 3, augment: bool = False,
               crop_scale=(0.08, 1.0), flip: bool = True):
    if kind not in KINDS:
      raise ValueError(f"unknown preprocessing {kind!r}: one of {', '.join(KINDS)}")
    self.kind, self.size, self.channels = kind, image_size, channels
    self.augment, self.crop_scale, self.flip = augment, tuple(crop_scale), flip
    imagenet = kind in ("deit", "deit_center")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.5,) * 3, (0.5,) * 3)
    self.mean = np.asarray(mean[:channels], np.float32)
    self.std = np.asarray(std[:channels], np.float32)

  def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    from PIL import Image
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] != self.channels:
      if image.shape[-1] == 1 and self.channels == 3:
        image = np.repeat(image, 3, -1)
      else:
        raise DataError(f"image has {image.shape[-1]} channels, the model expects {self.channels}")
    pil = Image.fromarray(image[..., 0] if self.channels == 1 else image)
    if self.augment and rng is not None:
      pil = self._random_resized_crop(pil, rng)
      if self.flip and rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif self.kind in ("vit_center", "deit_center"):
      w, h = pil.size
      short, long = min(w, h), max(w, h)
      long = int(self.size * long / short)  # as transformers' shortest_edge resize
      pil = pil.resize((self.size, long) if w <= h else (long, self.size),
                       Image.Resampling.BILINEAR)
      left, top = (pil.size[0] - self.size) // 2, (pil.size[1] - self.size) // 2
      pil = pil.crop((left, top, left + self.size, top + self.size))
    elif self.kind == "deit":
      big = int(round(self.size * 256 / 224))
      pil = pil.resize((big, big), Image.Resampling.BICUBIC)
      off = (big - self.size) // 2
      pil = pil.crop((off, off, off + self.size, off + self.size))
    elif pil.size != (self.size, self.size):
      pil = pil.resize((self.size, self.size), Image.Resampling.BILINEAR)
    x = np.asarray(pil, np.float32).reshape(self.size, self.size, self.channels) / 255.0
    return (x - self.mean) / self.std

  def _random_resized_crop(self, pil, rng):
    from PIL import Image
    w, h = pil.size
    for _ in range(10):
      area = w * h * rng.uniform(*self.crop_scale)
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
      if 0 < cw <= w and 0 < ch <= h:
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        break
    else:
      cw = ch = min(w, h)
      x0, y0 = (w - cw) // 2, (h - ch) // 2
    return pil.resize((self.size, self.size), Image.Resampling.BILINEAR,
                      box=(x0, y0, x0 + cw, y0 + ch))


# ----------------------------------------------------------------------------- loading

class Loader:
  """Deterministic, resumable batches of one split for this host.

  Training (``train=True``): shuffled per epoch, incomplete last batch dropped.
  Evaluation: every example once in order, the last batch padded; ``mask`` marks real rows.
  """

  def __init__(self,
               source,
               preprocess: Preprocess,
               global_batch: int,
               *,
               train: bool,
               seed: int = 0,
               process_index: int = 0,
               process_count: int = 1,
               num_threads: int = 8,
               prefetch: int = 4):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
    self.source, self.preprocess, self.train, self.seed = source, preprocess, train, seed
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.process_index = process_index
    self.num_threads, self.prefetch = num_threads, prefetch
    n = len(source)
    if train and n < global_batch:
      raise ValueError(
          f"the training split has {n} examples, fewer than one batch of {global_batch}")
    self.steps_per_epoch = n // global_batch if train else -(-n // global_batch)

  def _epoch_indices(self, epoch: int) -> np.ndarray:
    n = len(self.source)
    if self.train:
      idx = np.random.default_rng([self.seed, epoch]).permutation(n)
      return idx[: self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, -1)
    idx = np.full(self.steps_per_epoch * self.global_batch, -1, np.int64)
    idx[:n] = np.arange(n)
    return idx.reshape(self.steps_per_epoch, -1)

  def _example(self, epoch: int, i: int):
    if i < 0:
      return None
    image, label = self.source[i]
    rng = np.random.default_rng([self.seed, epoch, i]) if self.train else None
    return self.preprocess(image, rng), label

  def _batch(self, pool, epoch, rows):
    rows = rows[self.process_index * self.local_batch:(self.process_index + 1) * self.local_batch]
    examples = list(pool.map(lambda i: self._example(epoch, i), rows))
    shape = (self.preprocess.size, self.preprocess.size, self.preprocess.channels)
    images = np.stack([e[0] if e else np.zeros(shape, np.float32) for e in examples])
    labels = np.asarray([e[1] if e else 0 for e in examples], np.int32)
    mask = np.asarray([e is not None for e in examples], bool)
    return {"image": images, "label": labels, "mask": mask}

  def iterate(self, start_step: int = 0, num_steps: Optional[int] = None) -> Iterator[dict]:
    """Batches for global steps [start_step, start_step + num_steps), in a background thread."""
    if num_steps is None:
      num_steps = self.steps_per_epoch - start_step % self.steps_per_epoch
    q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
    stop = threading.Event()

    def produce():
      try:
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
          cache = {}
          for step in range(start_step, start_step + num_steps):
            if stop.is_set():
              return
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch not in cache:
              cache = {epoch: self._epoch_indices(epoch)}
            q.put(self._batch(pool, epoch, cache[epoch][k]))
        q.put(None)
      except BaseException as e:  # surfaced in the consumer
        q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = q.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop.set()
