import os

import numpy as np
import pytest
from PIL import Image

from lsvit import data


def test_digits_splits_are_real_and_disjoint():
  tr, va = data.digits("train"), data.digits("validation")
  assert len(tr) + len(va) == 1797 and len(va) == 359
  assert tr[0][0].shape == (8, 8, 1) and tr[0][0].dtype == np.uint8
  trs = {tr.images[i].tobytes() + bytes([tr.labels[i]]) for i in range(len(tr))}
  assert sum(va.images[i].tobytes() + bytes([va.labels[i]]) in trs for i in range(len(va))) < 5
  assert set(np.unique(tr.labels)) == set(range(10))


def test_vit_preprocessing_matches_transformers():
  from transformers import ViTImageProcessor
  img = np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8)
  ours = data.Preprocess("vit", 224)(img)
  ref = ViTImageProcessor()(Image.fromarray(img), return_tensors="np")["pixel_values"][0]
  np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-5)


def test_deit_preprocessing_matches_transformers():
  from transformers import DeiTImageProcessor
  img = np.random.default_rng(1).integers(0, 256, (300, 260, 3), np.uint8)
  ours = data.Preprocess("deit", 224)(img)
  # as in facebook/deit-base-distilled-patch16-224's preprocessor_config.json
  proc = DeiTImageProcessor(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224},
                            resample=Image.Resampling.BICUBIC, image_mean=data.IMAGENET_MEAN,
                            image_std=data.IMAGENET_STD)
  ref = proc(Image.fromarray(img), return_tensors="np")["pixel_values"][0]
  np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-5)


def test_augmentation_is_seeded():
  img = np.random.default_rng(2).integers(0, 256, (64, 48, 3), np.uint8)
  pp = data.Preprocess("vit", 32, augment=True, crop_scale=(0.3, 1.0))
  a = pp(img, np.random.default_rng([0, 1, 2]))
  b = pp(img, np.random.default_rng([0, 1, 2]))
  c = pp(img, np.random.default_rng([0, 1, 3]))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 3) and np.abs(a - c).max() > 0


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20):
    src = data.TfdsSource("cifar100", "train")
    assert len(src) == 20 and src.num_classes == 100
    image, label = src[3]
    assert image.shape == (32, 32, 3) and 0 <= label < 100
    loader = data.Loader(src, data.Preprocess("vit", 48), 8, train=True, seed=0)
    batch = next(loader.iterate(0))
    assert batch["image"].shape == (8, 48, 48, 3) and batch["label"].shape == (8,)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.TfdsSource("imagenet2012", "train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "not prepared" in msg and "ILSVRC2012_img_train.tar" in msg
  assert f"--manual_dir={tmp_path}/downloads/manual" in msg and "tfds build imagenet2012" in msg
  assert not (tmp_path / "downloads").exists()  # no download was started
  with pytest.raises(data.DataError, match="tfds build cifar100 --file_format=array_record"):
    data.TfdsSource("cifar100", "train", data_dir=str(tmp_path))


def make_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=(20, 30)):
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c in classes:
      os.makedirs(root / split / c, exist_ok=True)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(root / split / c / f"{i}.png")
  return root


def test_folder_source(tmp_path):
  make_folder(tmp_path)
  tr = data.FolderSource(str(tmp_path), "train")
  assert tr.classes == ["cat", "dog", "eel"] and len(tr) == 12
  image, label = tr[5]
  assert image.shape == (20, 30, 3) and label == 1
  loader = data.Loader(data.FolderSource(str(tmp_path), "val", tr.classes), data.Preprocess("vit", 16),
                       5, train=False)
  batches = list(loader.iterate(0))
  assert len(batches) == 3 and batches[-1]["mask"].tolist() == [True, True, False, False, False]
  with pytest.raises(data.DataError, match="expected .*/test/<class>/<image files>"):
    data.FolderSource(str(tmp_path), "test")


def test_loader_resumes_and_shards_deterministically():
  src = data.digits("train")
  pp = data.Preprocess("plain", 8, 1)
  full = data.Loader(src, pp, 64, train=True, seed=3)
  spe = full.steps_per_epoch
  batches = list(full.iterate(0, 2 * spe))
  resumed = list(full.iterate(spe + 5, 3))
  for a, b in zip(batches[spe + 5: spe + 8], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(batches[0]["label"], batches[spe]["label"])  # reshuffled each epoch
  halves = [next(data.Loader(src, pp, 64, train=True, seed=3, process_index=i, process_count=2)
                 .iterate(4, 1)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), batches[4]["label"])
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    data.Loader(src, pp, 64, train=True, process_count=3)
