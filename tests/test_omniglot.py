"""Few-shot Omniglot: the episodic datamodule on fake trees in the real layout, prototypical networks, the
nearest-neighbour floor and test confidence intervals (the CLI configs and the predict script: test_omniglot_cli)."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from omniglot_fakes import BACKGROUND, EVALUATION, write_tree, zip_tree
from torchvision.datasets import omniglot as tv_omniglot
from torchvision.datasets.utils import extract_archive

import datamodules.omniglot_images as omniglot_images
from datamodules import CorruptDataError, DataNotFoundError
from datamodules.loaders import ResumableDataLoader, collate_batch
from datamodules.omniglot import EpisodeSampler, OmniglotDataModule, load_tree
from lightning_modules.few_shot import (
    NearestNeighbourBaseline,
    ProtoNet,
    ProtoNetEncoder,
    mean_and_ci95,
    nearest_neighbour_logits,
    prototypes,
    squared_euclidean,
    unique_episodes,
)


def datamodule(data_dir: Path, **kwargs) -> OmniglotDataModule:
    options = dict(data_dir=str(data_dir), cache_dir=str(data_dir / "cache"), train_way=10, train_episodes=6)
    return OmniglotDataModule(**{**options, **kwargs})


def drawing_matches(image: torch.Tensor, table, character: int, turns: int) -> int:
    """How many drawings of ``character`` (rotated ``turns`` quarter turns) equal ``image``."""
    start, count = int(table.offsets[character]), int(table.counts[character])
    drawings = torch.rot90(table.images[start : start + count], turns, dims=(-2, -1))
    return int((drawings == image).flatten(1).all(1).sum())


# ---- decoding and caching ----------------------------------------------------------------------------------------


def test_tree_is_decoded_once_and_cached(omniglot_dir, tmp_path, monkeypatch):
    tree = omniglot_dir / "omniglot-py" / "images_background"
    table = load_tree(tree, image_size=28, cache_dir=tmp_path, write_cache=True)
    assert table.images.shape == (30 * 20, 1, 28, 28) and table.images.dtype == torch.uint8
    assert table.characters[:2] == ["Alpha/character01", "Alpha/character02"] and len(table.characters) == 30
    assert table.counts.tolist() == [20] * 30 and table.offsets[:3].tolist() == [0, 20, 40]
    # Strokes bright on a dark background: most pixels are background (0), the strokes are bright.
    assert table.images.float().mean() < 80 and table.images.max() == 255
    assert len(list(tmp_path.glob("omniglot_images_background_28px_*.pt"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(omniglot_images, "decode_tree", no_decoding)
    cached = load_tree(tree, image_size=28, cache_dir=tmp_path)
    assert torch.equal(cached.images, table.images) and cached.characters == table.characters
    with pytest.raises(AssertionError, match="decoded again"):  # other options -> another cache entry
        load_tree(tree, image_size=20, cache_dir=tmp_path)


def test_prepare_data_writes_the_caches_that_setup_reads(omniglot_dir, tmp_path, monkeypatch):
    dm = datamodule(omniglot_dir, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # background and evaluation
    monkeypatch.setattr(omniglot_images, "decode_tree", lambda *a, **k: pytest.fail("setup decoded PNGs"))
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set is not None and dm.test_set is not None


def test_wrong_layouts_and_damaged_files_get_clear_errors(omniglot_dir, tmp_path):
    with pytest.raises(DataNotFoundError, match="one level deeper"):  # the folder above the alphabets
        load_tree(omniglot_dir / "omniglot-py")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_tree(tmp_path / "nowhere")
    tree = write_tree(tmp_path / "tree", {"Alpha": 2}, drawings=3, size=20)
    bad = tree / "Alpha" / "character02" / "0001_02.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CorruptDataError, match=r"0001_02\.png"):
        load_tree(tree)


def test_download_goes_through_torchvision_and_fails_clearly_offline(omniglot_dir, tmp_path, monkeypatch):
    # Offline: the download fails -> one error that says where to put which files.
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match=r"images_background\.zip"):
        datamodule(tmp_path / "empty").prepare_data()

    # "Online": torchvision's download extracts the official zip; its md5 check is patched for our fake zips.
    zips = {}
    for name in ("images_background", "images_evaluation"):
        zips[name] = zip_tree(omniglot_dir / "omniglot-py" / name, tmp_path / f"{name}.zip")

    def fake_download(url, download_root, filename, md5):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        shutil.copy(zips[filename.removesuffix(".zip")], Path(download_root) / filename)
        extract_archive(str(Path(download_root) / filename), download_root)

    monkeypatch.setattr(tv_omniglot, "download_and_extract_archive", fake_download)
    monkeypatch.setattr(tv_omniglot, "check_integrity", lambda path, md5=None: Path(path).is_file())
    dm = datamodule(tmp_path / "fresh")
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "fresh" / "omniglot-py" / "images_evaluation" / "Eta").is_dir()
    assert len(dm.pools["train"]) + len(dm.pools["val"]) == 30


# ---- episodes ----------------------------------------------------------------------------------------------------


def test_episodes_have_the_right_shapes_labels_and_images(omniglot_dir):
    dm = datamodule(omniglot_dir, train_way=7, train_shot=2, train_query=3, test_way=4, test_shot=3, test_query=2)
    dm.setup("fit")
    episode = next(iter(dm.train_dataloader()))
    assert episode["support"].shape == (7 * 2, 1, 28, 28) and episode["support"].dtype == torch.uint8
    assert episode["query"].shape == (7 * 3, 1, 28, 28)
    assert episode["support_labels"].tolist() == [c for c in range(7) for _ in range(2)]
    assert episode["query_labels"].tolist() == [c for c in range(7) for _ in range(3)]
    classes = episode["classes"]
    assert classes.shape == (7, 2) and len({tuple(c) for c in classes.tolist()}) == 7
    # Every image is a drawing of its class's character, rotated by the class's turns; no drawing twice.
    table = dm.train_set.table
    for c, (character, turns) in enumerate(classes.tolist()):
        images = torch.cat([episode["support"][2 * c : 2 * c + 2], episode["query"][3 * c : 3 * c + 3]])
        assert all(drawing_matches(image, table, character, turns) == 1 for image in images)
        assert len({image.numpy().tobytes() for image in images}) == 5
    val = next(iter(dm.val_dataloader()))
    assert val["support"].shape == (4 * 3, 1, 28, 28) and val["query"].shape == (4 * 2, 1, 28, 28)
    # On the device: floats in [0, 1].
    batch = dm.on_after_batch_transfer(dict(val), 0)
    assert batch["query"].dtype == torch.float32 and 0 <= batch["query"].min() < batch["query"].max() <= 1


def test_class_pools_are_disjoint_and_only_training_is_rotated(omniglot_dir):
    dm = datamodule(omniglot_dir, val_alphabets=1)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (set(dm.pools[s]) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) == 24 and len(val) == 6 and len(test) == 10
    assert len({name.split("/")[0] for name in val}) == 1  # one whole alphabet held out
    assert {name.split("/")[0] for name in test} == set(EVALUATION)
    assert set(dm.train_set.classes[:, 1].tolist()) == {0, 1, 2, 3} and len(dm.train_set.classes) == 4 * 24
    assert set(dm.val_set.classes[:, 1].tolist()) == {0} and set(dm.test_set.classes[:, 1].tolist()) == {0}
    episodes = [dm.train_set.episode(0, 0, i) for i in range(10)]
    assert {t for e in episodes for t in e["classes"][:, 1].tolist()} == {0, 1, 2, 3}
    no_rotation = datamodule(omniglot_dir, rotations=False)
    no_rotation.setup("fit")
    assert set(no_rotation.train_set.classes[:, 1].tolist()) == {0}


def test_characters_split_pools_both_trees_disjointly(omniglot_dir):
    dm = datamodule(omniglot_dir, split="characters", val_classes=5, test_classes=0.25)
    dm.setup("fit")
    dm.setup("test")
    pools = {s: set(dm.pools[s]) for s in ("train", "val", "test")}
    assert [len(pools[s]) for s in ("train", "val", "test")] == [25, 5, 10]
    assert pools["train"] | pools["val"] | pools["test"] == {
        f"{a}/character{c + 1:02d}" for a, n in {**BACKGROUND, **EVALUATION}.items() for c in range(n)
    }
    assert not (pools["train"] & pools["test"]) and not (pools["val"] & pools["test"])


def test_alphabets_in_both_trees_are_left_out_of_the_test_pool(tmp_path):
    background = write_tree(tmp_path / "small1", {"Greek": 3, "Latin": 3, "Korean": 4}, drawings=6, size=20)
    evaluation = write_tree(tmp_path / "small2", {"Greek": 3, "Tagalog": 5}, drawings=6, size=20)
    dm = OmniglotDataModule(
        background_dir=str(background), evaluation_dir=str(evaluation), cache=False, train_way=5, test_query=2
    )
    with pytest.warns(UserWarning, match="Greek"):
        dm.setup("test")
    assert {name.split("/")[0] for name in dm.pools["test"]} == {"Tagalog"}


def test_bad_episode_settings_get_clear_errors(omniglot_dir, tmp_path):
    with pytest.raises(ValueError, match="60-way"):
        datamodule(omniglot_dir, train_way=60, rotations=False).setup("fit")
    with pytest.raises(ValueError, match="Lower test_way"):
        datamodule(omniglot_dir, test_way=11).setup("test")
    with pytest.raises(CorruptDataError, match="fewer drawings"):
        datamodule(omniglot_dir, test_shot=10, test_query=15).setup("test")
    with pytest.raises(ValueError, match="at least 2 classes"):
        OmniglotDataModule(train_way=1)


def test_same_seed_same_episodes_and_ranks_draw_different_ones(omniglot_dir):
    dm = datamodule(omniglot_dir, train_episodes=8)
    dm.setup("fit")
    dataset = dm.train_set

    def keys_and_classes(sampler):
        return [(key[2], dataset[key]["classes"].tolist()) for key in sampler]

    single = EpisodeSampler(dataset, seed=3)
    assert keys_and_classes(single) == keys_and_classes(EpisodeSampler(dataset, seed=3))
    assert torch.equal(dataset[(3, 0, 1)]["query"], dataset[(3, 0, 1)]["query"])
    other_seed = keys_and_classes(EpisodeSampler(dataset, seed=4))
    assert [c for _, c in other_seed] != [c for _, c in keys_and_classes(single)]
    single.set_epoch(1)
    assert [c for _, c in keys_and_classes(single)] != [c for _, c in other_seed]
    # Two DDP ranks: disjoint shares of the same episodes a single process draws.
    single.set_epoch(0)
    ranks = [EpisodeSampler(dataset, seed=3, num_replicas=2, rank=r) for r in range(2)]
    shares = [keys_and_classes(s) for s in ranks]
    assert [i for i, _ in shares[0]] == [0, 2, 4, 6] and [i for i, _ in shares[1]] == [1, 3, 5, 7]
    assert sorted(shares[0] + shares[1]) == sorted(keys_and_classes(single))
    # Validation/test episodes do not change with the epoch.
    fixed = EpisodeSampler(dataset, seed=3, vary_with_epoch=False)
    first = list(fixed)
    fixed.set_epoch(5)
    assert list(fixed) == first


def test_episode_order_resumes_in_mid_epoch(omniglot_dir):
    dm = datamodule(omniglot_dir, train_episodes=6)
    dm.setup("fit")

    def loader():
        sampler = EpisodeSampler(dm.train_set, seed=0)
        return ResumableDataLoader(dm.train_set, batch_size=1, sampler=sampler, collate_fn=collate_batch)

    full = [e["episode"].item() for e in loader()]
    interrupted = loader()
    iterator = iter(interrupted)
    seen = [next(iterator)["episode"].item() for _ in range(4)]
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + [e["episode"].item() for e in resumed] == full


# ---- the model ---------------------------------------------------------------------------------------------------


def test_distances_prototypes_and_nearest_neighbour_by_hand():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    labels = torch.tensor([0, 0, 1, 1])
    centres = prototypes(support, labels, 2)
    assert torch.equal(centres, torch.tensor([[1.0, 0.0], [10.0, 11.0]]))
    query = torch.tensor([[1.0, 1.0], [10.0, 9.0]])
    assert torch.equal(squared_euclidean(query, centres), torch.tensor([[1.0, 181.0], [162.0, 4.0]]))
    nn_logits = nearest_neighbour_logits(support, labels, query, 2)
    assert torch.equal(nn_logits, -torch.tensor([[2.0, 162.0], [145.0, 1.0]]))
    mean, ci = mean_and_ci95(torch.tensor([0.5, 1.0, 0.75, 1.0]))
    assert mean == pytest.approx(0.8125)
    assert ci == pytest.approx(1.96 * np.std([0.5, 1.0, 0.75, 1.0], ddof=1) / 2)
    episodes, accuracy = unique_episodes(torch.tensor([3, 1, 3, 2, 1]), torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1]))
    assert episodes.tolist() == [1, 2, 3] and accuracy.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_encoder_gives_64_numbers_per_image():
    assert ProtoNetEncoder()(torch.zeros(3, 1, 28, 28)).shape == (3, 64)
    assert ProtoNetEncoder(filters=8, blocks=3)(torch.zeros(2, 1, 28, 28)).shape == (2, 8 * 3 * 3)


def test_prototypical_loss_falls_and_beats_the_pixel_floor(omniglot_dir):
    torch.manual_seed(0)
    dm = datamodule(omniglot_dir, train_way=5, train_query=5, train_episodes=40, test_episodes=40)
    dm.setup("fit")
    dm.setup("test")
    model = ProtoNet(num_classes=5, filters=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(40):
        episode = dm.on_after_batch_transfer(dm.train_set[(0, 0, i)], 0)
        loss = torch.nn.functional.cross_entropy(model.logits(episode), episode["query_labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    model.eval()
    with torch.no_grad():
        test = [dm.on_after_batch_transfer(dm.test_set[(42, 0, i)], 0) for i in range(40)]
        accuracy = np.mean([(model.logits(e).argmax(-1) == e["query_labels"]).float().mean() for e in test])
        pixels = NearestNeighbourBaseline().eval()
        floor = np.mean([(pixels.logits(e).argmax(-1) == e["query_labels"]).float().mean() for e in test])
    assert accuracy > 0.5 and floor > 0.2  # both far above chance (0.2) on unseen alphabets ...
    assert accuracy >= floor - 0.05  # ... and 40 training episodes already reach the pixel floor


def test_test_metrics_are_a_mean_with_a_confidence_interval(omniglot_dir, tmp_path):
    dm = datamodule(omniglot_dir, test_episodes=12, test_query=4)
    model = NearestNeighbourBaseline(features="random_encoder", num_classes=10)
    metrics = quiet_trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    assert metrics["test/episodes"] == 12 and 0.2 < metrics["test/acc"] <= 1
    dm.setup("test")
    model.eval()  # as in testing: the random encoder's BatchNorm uses its running statistics
    per_episode = []
    with torch.no_grad():
        for i in range(12):
            episode = dm.on_after_batch_transfer(dm.test_set[(42, 0, i)], 0)
            per_episode.append((model.logits(episode).argmax(-1) == episode["query_labels"]).float().mean())
    mean, ci = mean_and_ci95(torch.stack(per_episode))
    assert metrics["test/acc"] == pytest.approx(mean, abs=1e-6)
    assert metrics["test/acc_ci95"] == pytest.approx(ci, abs=1e-6) and ci > 0
    assert "test/loss" not in metrics  # the pixel/random-encoder floor has no calibrated logits


def test_model_and_data_must_agree(omniglot_dir, tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(
            ProtoNet(num_classes=10, input_shape=(1, 32, 32)), datamodule(omniglot_dir)
        )
    with pytest.raises(ValueError, match="num_classes 10"):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(ProtoNet(num_classes=60), datamodule(omniglot_dir))
