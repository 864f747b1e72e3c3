import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SGSCTypeError, SGSCValueError
from lightning_sgsc.examples import DigitsCNN, DigitsDataModule
from lightning_sgsc.preservation import PreservationSet, build_preservation_set
from lightning_sgsc.preservation.scoring import score_pool
from tests.helpers.models import TinyMLP


@pytest.fixture(scope="module")
def trained():
    """A DigitsCNN trained for 3 epochs on digits (about a second on CPU), and its training data."""
    torch.manual_seed(0)
    data = DigitsDataModule(seed=0)
    data.setup()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.train_set.tensors
    for _ in range(3):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return model.eval(), data.train_set


def _random(model, data, n, seed=1):
    return build_preservation_set(model, data, n, fractions={"random": 1.0}, seed=seed)


def test_uncertainty_choices_have_higher_loss_than_random(trained):
    model, data = trained
    chosen = build_preservation_set(model, data, 100, fractions={"uncertainty": 1.0})
    rand = _random(model, data, 100)

    def mean_loss(s):
        x, y = s.data
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    assert mean_loss(chosen) > 2 * mean_loss(rand)
    assert set(chosen.chosen_by) == {"uncertainty"}


def test_gradcam_choices_have_higher_cam_intensity_than_random(trained):
    model, data = trained
    chosen = build_preservation_set(model, data, 100, fractions={"gradcam": 1.0})
    rand = _random(model, data, 100)
    x, y = rand.data
    rand_cam = score_pool(model, [(x, y)]).gradcam
    assert chosen.scores["gradcam"].mean() > 1.5 * rand_cam.mean()


def test_kmeans_choices_are_more_spread_than_random(trained):
    model, data = trained
    chosen = build_preservation_set(model, data, 40, fractions={"kmeans": 1.0})
    rand = _random(model, data, 40)

    def spread(s):
        emb = score_pool(model, [s.data], with_gradcam=False).embeddings
        return torch.pdist(emb).mean().item()

    assert spread(chosen) > spread(rand)


def test_budget_split_dedup_indices_and_reproducibility(trained):
    model, data = trained
    a = build_preservation_set(model, data, 30, fractions={"gradcam": 0.5, "uncertainty": 0.3, "kmeans": 0.2}, seed=3)
    b = build_preservation_set(model, data, 30, fractions={"gradcam": 0.5, "uncertainty": 0.3, "kmeans": 0.2}, seed=3)
    assert len(a) == 30 and len(set(a.indices.tolist())) == 30
    assert [a.chosen_by.count(k) for k in ("gradcam", "uncertainty", "kmeans")] == [15, 9, 6]
    assert torch.equal(a.indices, b.indices)
    x, y = a.data
    assert torch.equal(x, data.tensors[0][a.indices]) and torch.equal(y, data.tensors[1][a.indices])


def test_balance_classes_caps_each_class(trained):
    model, data = trained
    s = build_preservation_set(model, data, 50, fractions={"uncertainty": 1.0}, balance_classes=True)
    assert torch.bincount(s.data[1], minlength=10).max() <= 5


def test_a_dataloader_is_read_in_order_even_if_it_shuffles(trained):
    model, data = trained
    loader = DataLoader(data, batch_size=100, shuffle=True)
    from_loader = build_preservation_set(model, loader, 20, fractions={"uncertainty": 1.0})
    from_dataset = build_preservation_set(model, data, 20, fractions={"uncertainty": 1.0})
    assert torch.equal(from_loader.indices, from_dataset.indices)


def test_save_and_load_without_pickle(tmp_path, trained):
    model, data = trained
    s = build_preservation_set(model, data, 12)
    s.save(tmp_path / "set.safetensors")
    assert b"pickle" not in (tmp_path / "set.safetensors").read_bytes()[:200]
    loaded = PreservationSet.load(tmp_path / "set.safetensors")
    assert torch.equal(loaded.indices, s.indices) and loaded.chosen_by == s.chosen_by
    for a, b in zip(loaded.data, s.data, strict=True):
        assert torch.equal(a, b)
    assert_close(loaded.scores["gradcam"], s.scores["gradcam"], atol=0, rtol=0)


@pytest.mark.parametrize("size", [0, -3, 10_000, 2.5])
def test_bad_sizes(trained, size):
    model, data = trained
    with pytest.raises(SGSCValueError, match=r"`size` must be an integer from 1 to the pool size \(1258\)"):
        build_preservation_set(model, data, size)


@pytest.mark.parametrize(
    ("fractions", "match"),
    [
        ({"gradcam": 0.5, "kmeans": 0.4}, r"`fractions` must be shares that sum to 1"),
        ({"saliency": 1.0}, r"`fractions` must be keys among \['gradcam', 'kmeans', 'random', 'uncertainty'\]"),
        ({"gradcam": -0.5, "kmeans": 1.5}, r"`fractions\['gradcam'\]` must be a number >= 0"),
    ],
)
def test_bad_fractions(trained, fractions, match):
    model, data = trained
    with pytest.raises(SGSCValueError, match=match):
        build_preservation_set(model, data, 10, fractions=fractions)


def test_unknown_target_layer_lists_the_candidates(trained):
    model, data = trained
    with pytest.raises(
        SGSCValueError, match=r"`target_layer` must be the name .* got 'conv9'\. .*\['conv1', 'conv2'\]"
    ):
        build_preservation_set(model, data, 10, target_layer="conv9")


def test_model_without_logits_and_empty_data():
    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(10, 4)

        def forward(self, x):
            return self.fc(x).unsqueeze(1)  # (batch, 1, 4): not class logits

    data = TensorDataset(torch.randn(20, 10), torch.zeros(20).long())
    with pytest.raises(SGSCTypeError, match=r"`model output` must be per-position class scores of shape .*modality"):
        build_preservation_set(Embedder(), data, 5, fractions={"uncertainty": 1.0})
    with pytest.raises(SGSCTypeError, match=r"`model output` must be class logits of shape \(batch, classes\)"):
        build_preservation_set(Embedder(), data, 5, fractions={"uncertainty": 1.0}, modality="image")
    with pytest.raises(SGSCValueError, match=r"the model has no Conv2d layer for the attention score: give 'gradcam'"):
        build_preservation_set(TinyMLP(), data, 5)
    empty = TensorDataset(torch.zeros(0, 10), torch.zeros(0).long())
    with pytest.raises(SGSCValueError, match=r"`data` must be a non-empty Dataset or DataLoader"):
        build_preservation_set(TinyMLP(), DataLoader(empty), 5, fractions={"uncertainty": 1.0})


@pytest.fixture(scope="module")
def trained_lm():
    """A one-block character transformer trained briefly on sequences from two patterns plus random noise."""
    from tests.helpers.models import TinyTransformer

    g = torch.Generator().manual_seed(0)
    n = 300
    seqs = torch.randint(0, 11, (n, 9), generator=g)
    easy = torch.arange(n) % 3 != 0  # two thirds follow a fixed counting pattern, a third stay random
    seqs[easy] = (torch.arange(9) + torch.randint(0, 11, (int(easy.sum()), 1), generator=g)) % 11
    x, y = seqs[:, :-1], seqs[:, 1:]
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x).transpose(1, 2), y).backward()
        opt.step()
    return model.eval(), TensorDataset(x, y), easy


def test_text_uncertainty_picks_the_unpredictable_sequences(trained_lm):
    model, data, easy = trained_lm
    chosen = build_preservation_set(model, data, 60, fractions={"uncertainty": 1.0})
    assert chosen.scores["uncertainty"].shape == (60,)
    share_random = (~easy[chosen.indices]).float().mean().item()
    assert share_random > 0.9  # a third of the data is random, the chosen are almost all random


def test_text_saliency_and_kmeans_beat_random(trained_lm):
    model, data, _ = trained_lm
    rand = _random(model, data, 50)
    sal = build_preservation_set(model, data, 50, fractions={"gradcam": 1.0})
    rand_sal = score_pool(model, [rand.data]).gradcam
    assert sal.scores["gradcam"].mean() > rand_sal.mean()
    div = build_preservation_set(model, data, 20, fractions={"kmeans": 1.0})
    spread = [torch.pdist(score_pool(model, [s.data], with_gradcam=False).embeddings).mean() for s in (div, rand)]
    assert spread[0] > spread[1]
    with pytest.raises(SGSCValueError, match=r"`balance_classes` must be False for tokens outputs"):
        build_preservation_set(model, data, 10, balance_classes=True)


def test_kmeans_keeps_blas_single_threaded(monkeypatch):
    # OpenBLAS workers busy-wait after a multi-threaded call and slow the training steps that follow the scoring
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_info

    from lightning_sgsc.preservation.scoring import kmeans_representatives

    seen = []
    fit_predict = KMeans.fit_predict

    def spy(self, *args, **kwargs):
        seen.append([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"])
        return fit_predict(self, *args, **kwargs)

    monkeypatch.setattr(KMeans, "fit_predict", spy)
    reps = kmeans_representatives(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), 5, seed=0)
    assert len(reps) == 5
    assert seen and seen[0] and all(n == 1 for n in seen[0])
