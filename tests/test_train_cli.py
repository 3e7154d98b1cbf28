import os
import subprocess
import sys

from tests.helpers import ROOT, digits_config


def test_default_workdir_names_config_variant_and_seed():
  from lsvit import cli
  c = digits_config(seed=3)
  assert cli.default_workdir("configs/digits.py", c) == os.path.join("runs", "digits_layershuffle_seed3")
  c = digits_config(variant="baseline", keep_layers=6)
  assert cli.default_workdir("configs/vit_in1k.py", c) == os.path.join("runs", "vit_in1k_baseline_keep6_seed0")


def test_missing_dataset_exits_nonzero_with_the_steps_to_prepare_it(tmp_path):
  r = subprocess.run([sys.executable, "train.py", "--config=configs/vit_cifar100.py",
                      f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert "dataset 'cifar100' is not prepared" in r.stderr
  assert "tfds build cifar100 --file_format=array_record" in r.stderr
  assert "Traceback" not in r.stderr


def test_global_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  r = subprocess.run([sys.executable, "train.py", "--config=configs/digits.py", "--config.batch_size=30",
                      "--config.pretrain_epochs=0", f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r.returncode == 1
  assert "batch_size=30 is not divisible by the 4 devices; use a multiple of 4" in r.stderr
  assert "Traceback" not in r.stderr
