"""`mil train features --device/--precision`: where and how heads train (CPU here; CUDA on a GPU machine)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mil.checkpoint import load_head
from mil.device import autocast_dtype
from mil.errors import OptionError
from tests.conftest import invoke_mil
from tests.train.test_run import needle_cohort


def _train(folder, m, out, *extra):
    args = ("train", "features", folder, "--manifest", m, "--out", out, "--epochs", "3", "--no-progress", *extra)
    r = invoke_mil(*args)
    assert r.returncode == 0, r.stderr
    return pd.read_csv(out / "predictions.csv")


def test_bf16_autocast_trains_and_checkpoints_stay_fp32_on_cpu(tmp_path):
    m = needle_cohort(tmp_path)
    fp32 = _train(tmp_path, m, tmp_path / "fp32", "--device", "cpu", "--precision", "fp32")
    bf16 = _train(tmp_path, m, tmp_path / "bf16", "--device", "cpu", "--precision", "bf16")
    runtime = json.loads((tmp_path / "bf16" / "config.json").read_text())["runtime"]
    assert runtime == {"device": "cpu", "precision": "bf16"}
    # autocast really ran (bf16 rounding moves the probabilities) and still learned the needle
    assert not np.array_equal(fp32["probability"], bf16["probability"])
    np.testing.assert_allclose(fp32["probability"], bf16["probability"], atol=0.1)
    assert bf16.groupby("label")["probability"].mean().diff().iloc[-1] > 0.3
    model, _ = load_head(tmp_path / "bf16" / "checkpoints" / "split.pt")
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    assert {p.device.type for p in model.state_dict().values()} == {"cpu"}
    # device and precision describe how a run ran, not what it is: a rerun with others skips
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "bf16", "--epochs", "3", "--precision", "fp32")
    assert r.returncode == 0 and "already trained" in r.stdout, r.stderr


def test_auto_precision_is_fp32_on_cpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(OptionError, match="expected --precision"):
        autocast_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    ("opt", "message"),
    [(("--device", "tpu"), "expected --device"), (("--precision", "half"), "expected --precision")],
)
def test_bad_device_or_precision_is_one_line(tmp_path, opt, message):
    m = needle_cohort(tmp_path, n=10)
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run", *opt)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    m = needle_cohort(tmp_path, n=10)
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and not (tmp_path / "run").exists()
