"""Multi-class slide classification: heads with n_classes, the cross-entropy, training, labels and refusals.

Binary (n_classes=2, the default) must stay exactly as it was: same modules, same outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mil.checkpoint import load_head
from mil.errors import ManifestError, OptionError
from mil.heads import MULTICLASS_HEADS, create_head, list_heads
from mil.labels import read_label_table
from mil.losses import BagCrossEntropyLoss
from mil.train.loop import TrainConfig
from mil.train.run import run_train
from tests.conftest import invoke_mil
from tests.train.test_run import D, write_bag

C = 3
NAMES = ("adeno", "normal", "squamous")  # sorted: adeno=0, normal=1, squamous=2


def class_cohort(folder, n=90, seed=0, names=None, n_classes=C):
    """Bags of N(0,1) instances; a bag of class k holds a few instances shifted along feature dimension k."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % n_classes
        X = rng.normal(size=(rng.integers(20, 60), D))
        X[: max(1, len(X) // 10), y] += 5.0
        write_bag(folder / f"b{i}.h5", X, f"b{i}")
        label = names[y] if names else y
        rows.append({"slide_id": f"b{i}", "path": f"b{i}.h5", "label": label, "split": "test" if i % 5 == 0 else "train"})
    m = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return m


def train_cohort(folder, seed=0, head="abmil", epochs=4, **kw):
    m = class_cohort(folder, seed=seed)
    table = read_label_table(m, n_classes=C)
    cfg = TrainConfig(head=head, head_kwargs={"n_classes": C}, epochs=epochs, seed=seed, **kw)
    return run_train(folder, table.slides, folder / "run", cfg, labels=table.describe())


# ---------------------------------------------------------------------------------------------- heads
def _bags(B=3, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, N, D, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return X, mask


@pytest.mark.parametrize("name", list_heads())
def test_binary_heads_are_unchanged_by_n_classes_2(name):
    X, mask = _bags()
    torch.manual_seed(0)
    plain = create_head(name, in_dim=D).eval()
    torch.manual_seed(0)
    two = create_head(name, in_dim=D, n_classes=2).eval()
    assert plain.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in plain.state_dict().items())
    a, b = plain(X, mask), two(X, mask)
    assert a.logits.shape == (3,) and a.instance_scores.shape == (3, 7)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.instance_scores, b.instance_scores)


@pytest.mark.parametrize("name", MULTICLASS_HEADS)
def test_multiclass_heads_shapes_and_padding_changes_nothing(name):
    X, mask = _bags()
    torch.manual_seed(0)
    head = create_head(name, in_dim=D, n_classes=C).eval()
    padded = X.masked_fill(~mask[..., None], float("nan"))  # padded rows are NaN
    out = head(padded, mask)
    assert out.logits.shape == (3, C) and out.instance_scores.shape == (3, 7, C)
    assert torch.isfinite(out.logits).all()
    for b in range(3):
        n = int(mask[b].sum())
        alone = head(X[b, :n][None])  # the same bag without padding
        torch.testing.assert_close(out.logits[b], alone.logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.instance_scores[b, :n], alone.instance_scores[0], rtol=1e-5, atol=1e-6)
        if out.attention is not None:
            torch.testing.assert_close(out.attention[b, :n], alone.attention[0], rtol=1e-5, atol=1e-6)
            assert (out.attention[b, n:] == 0).all()


def test_abmil_multiclass_logits_are_attention_weighted_instance_scores():
    X, mask = _bags()
    out = create_head("abmil", in_dim=D, n_classes=C).eval()(X, mask)
    torch.testing.assert_close(out.logits, torch.einsum("bn,bnc->bc", out.attention, out.instance_scores), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(list_heads()) - set(MULTICLASS_HEADS)))
def test_binary_only_heads_refuse_more_classes(name):
    with pytest.raises(OptionError, match=f"head '{name}'.*binary-only") as e:
        create_head(name, in_dim=D, n_classes=C)
    assert "\n" not in str(e.value)
    with pytest.raises(OptionError, match=f"head '{name}'.*binary-only"):
        TrainConfig(head=name, head_kwargs={"n_classes": C})


def test_n_classes_below_two_is_refused():
    with pytest.raises(OptionError, match="n_classes"):
        create_head("abmil", in_dim=D, n_classes=1)


# ---------------------------------------------------------------------------------------------- loss
def test_cross_entropy_matches_torch_and_weights_are_inverse_frequency():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    w = BagCrossEntropyLoss.class_weights_from_labels(labels, C)
    assert w == pytest.approx([6 / 9, 6 / 3, 6 / 6])  # n / (C · n_c)
    logits = torch.randn(6, C)
    got = BagCrossEntropyLoss(weight=w)(logits, labels)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor(w)))
    with pytest.raises(ValueError, match="labels in"):
        BagCrossEntropyLoss()(logits, torch.tensor([0, 1, 2, 3, 0, 1]))


# ---------------------------------------------------------------------------------------------- training
def test_three_classes_learn_on_three_seeds_and_the_run_records_them(tmp_path):
    aucs = {}
    for seed in (0, 1, 2):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        summary = train_cohort(folder, seed=seed)
        pred = pd.read_csv(folder / "run" / "predictions.csv")
        P = pred[[f"prob_{k}" for k in range(C)]].to_numpy()
        aucs[seed] = roc_auc_score(pred["label"], P, multi_class="ovr", average="macro")
        assert summary["val_auc"][0] == pytest.approx(aucs[seed])  # selection metric = macro one-vs-rest AUC
    assert all(a > 0.9 for a in aucs.values()), aucs
    run = tmp_path / "s0" / "run"
    assert np.isnan(summary["threshold"][0])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["n_classes"] == C and cfg["classes"] == ["0", "1", "2"] and cfg["train"]["head_kwargs"] == {"n_classes": C}
    model, ckpt = load_head(run / "checkpoints" / "split.pt")
    assert ckpt["n_classes"] == C and ckpt["classes"] == ["0", "1", "2"] and ckpt["threshold"] is None
    assert model(torch.randn(5, D)).logits.shape == (1, C)
    pred = pd.read_csv(run / "predictions.csv")
    assert list(pred.columns) == ["fold", "slide_id", "label", "prob_0", "prob_1", "prob_2", "predicted"]
    assert (pred["predicted"] == pred[["prob_0", "prob_1", "prob_2"]].to_numpy().argmax(axis=1)).all()


def test_a_fourth_label_in_a_three_class_run_is_refused(tmp_path):
    m = class_cohort(tmp_path, n=12, n_classes=4)
    with pytest.raises(ManifestError, match=r"line 5: expected a label 0\.\.2 for 3 classes.*'3'"):
        read_label_table(m, n_classes=C)
    slides = read_label_table(m, n_classes=4).slides
    with pytest.raises(ManifestError, match=r"expected labels 0\.\.2 for 3 classes, got label 3 for slide 'b3'"):
        run_train(tmp_path, slides, tmp_path / "run", TrainConfig(head_kwargs={"n_classes": C}, epochs=1))
    assert not (tmp_path / "run").exists()


def test_string_classes_are_mapped_in_sorted_order_and_recorded(tmp_path):
    m = class_cohort(tmp_path, n=45, names=NAMES)
    t = read_label_table(m, n_classes=C)
    assert t.label_map == {"adeno": 0, "normal": 1, "squamous": 2} and t.slides["label"].tolist()[:4] == [0, 1, 2, 0]
    with pytest.raises(ManifestError, match="two label classes.*--n-classes 3"):
        read_label_table(m)  # binary by default: three classes ask for --label-map or --n-classes
    r = invoke_mil(
        "train",
        "features",
        tmp_path,
        "--manifest",
        m,
        "--out",
        tmp_path / "run",
        "--n-classes",
        "3",
        "--head",
        "meanpool",
        "--epochs",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["labels"]["label_map"] == {"adeno": 0, "normal": 1, "squamous": 2}
    assert cfg["classes"] == list(NAMES) and cfg["labels"]["classes"] == list(NAMES)
    assert load_head(tmp_path / "run" / "checkpoints" / "split.pt")[1]["classes"] == list(NAMES)


def test_a_class_missing_from_a_folds_training_set_names_fold_and_class(tmp_path):
    m = class_cohort(tmp_path, n=30, names=NAMES)
    df = pd.read_csv(m)
    df.loc[df["label"] == "squamous", "split"] = "test"  # no squamous slide left to train on
    df.to_csv(m, index=False)
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run", "--n-classes", "3", "--no-progress")
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("labels: ")]  # the class map is echoed first
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "fold split" in r.stderr and "'squamous' (label 2)" in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(recipe="hnm-wsi"), "--recipe hnm-wsi"),
        (dict(ranking_weight=0.1), "--ranking-weight"),
        (dict(hard_negatives=True), "--hard-negatives"),
        (dict(max_instance_weight=0.5), "--max-instance-weight"),
    ],
)
def test_binary_only_recipe_and_losses_are_refused(kw, match):
    with pytest.raises(OptionError, match=f"{match}.*binary-only") as e:
        TrainConfig(head_kwargs={"n_classes": C}, **kw)
    assert "\n" not in str(e.value)


def test_cli_refuses_hnm_wsi_for_three_classes_in_one_line(tmp_path):
    m = class_cohort(tmp_path, n=15)
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "run", "--n-classes", "3", "--recipe", "hnm-wsi")
    assert r.returncode == 2 and "binary-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
