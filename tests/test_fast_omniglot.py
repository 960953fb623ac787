"""The fast Omniglot recipe: pooled small background sets, alphabets held out for testing, Lake et al.'s
within-alphabet one-shot runs, training-only augmentation of episodes, and configs/omniglot/fast.yaml through the CLI
(fit, test after fit, resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from few_shot_predict import load_model
from omniglot_fakes import write_tree
from PIL import Image
from train import main

from datamodules.augment import BatchAugment
from datamodules.episodes import dihedral, symmetry_ids
from datamodules.omniglot import OmniglotDataModule
from datamodules.omniglot_images import drawer_of, load_image, load_tree
from lightning_modules.few_shot import ProtoNet, ProtoNetEncoder, prototypes, squared_euclidean
from lightning_modules.tta import shift_averaged

ROOT = Path(__file__).resolve().parents[1]
SMALL1 = {"Alpha": 6, "Beta": 6}  # small1 and small2 share an alphabet, as the real ones share Greek and Latin
SMALL2 = {"Beta": 6, "Gamma": 7, "Delta": 3}


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> Path:
    """``omniglot-py/images_background_small1`` and ``small2`` (35x35 PNGs, 20 drawers) plus an evaluation tree."""
    data_dir = tmp_path_factory.mktemp("omniglot_small")
    base = data_dir / "omniglot-py"
    write_tree(base / "images_background_small1", SMALL1, size=35, seed=1)
    write_tree(base / "images_background_small2", SMALL2, size=35, seed=1)
    write_tree(base / "images_evaluation", {"Zeta": 5, "Eta": 6}, size=35, seed=2)
    return data_dir


def datamodule(data_dir: Path, **kwargs) -> OmniglotDataModule:
    options = dict(
        data_dir=str(data_dir),
        cache_dir=str(data_dir / "cache"),
        background_sets=["images_background_small1", "images_background_small2"],
        val_alphabets=0,
        train_way=10,
        train_episodes=8,
        test_within_alphabet=True,
        test_way=5,
        test_shot=1,
        test_query=1,
        test_episodes=12,
    )
    dm = OmniglotDataModule(**{**options, **kwargs})
    dm.prepare_data()
    return dm


def test_drawers_come_from_the_file_names():
    assert drawer_of(Path("0394_05.png"), 0) == 5 and drawer_of(Path("0394_17.png"), 3) == 17
    assert drawer_of(Path("scan.png"), 3) == 4  # no drawer suffix: the file's rank in its folder


def test_within_alphabet_runs_use_one_alphabet_and_two_drawers(small_sets):
    dm = datamodule(small_sets, test_alphabets=["Beta", "Gamma", "Delta"], test_shot=2, test_query=3, test_episodes=6)
    with pytest.warns(UserWarning, match="skipping the test alphabets \\['Delta'\\]"):
        dm.setup("test")
    table, dataset = dm.test_set.table, dm.test_set
    alphabets_seen = []
    for index in range(len(dataset)):
        episode = dataset.episode(dm.hparams.seed, 0, index)
        characters = episode["classes"][:, 0]
        alphabets = {table.alphabets[int(c)] for c in characters}
        assert len(alphabets) == 1 and len(set(characters.tolist())) == 5  # 5 characters of ONE alphabet
        alphabets_seen.append(alphabets.pop())
        assert episode["support"].shape == (5 * 2, 1, 28, 28) and episode["query"].shape == (5 * 3, 1, 28, 28)
        assert (episode["classes"][:, 1] == 0).all()  # never rotated
        # Every image is the drawing of its class's character by one of the support or query drawers.
        drawers = {}
        for part, per_class in (("support", 2), ("query", 3)):
            labels = episode[f"{part}_labels"]
            assert labels.tolist() == torch.arange(5).repeat_interleave(per_class).tolist()
            rows = [int(torch.nonzero((dataset.views == image).flatten(1).all(1))[0]) for image in episode[part]]
            for row, label in zip(rows, labels.tolist(), strict=True):
                c = int(characters[label])
                assert table.offsets[c] <= row < table.offsets[c] + table.counts[c]
            drawers[part] = table.drawers[rows].view(5, per_class)
        # The same drawers for every character (Lake et al.'s runs); support and query drawers disjoint.
        assert (drawers["support"] == drawers["support"][:1]).all() and (drawers["query"] == drawers["query"][:1]).all()
        assert not set(drawers["support"][0].tolist()) & set(drawers["query"][0].tolist())
    # Alphabets with enough characters take turns; Delta (3 characters) is too small for 5-way runs.
    assert alphabets_seen == ["Beta", "Gamma"] * 3
    again = dataset.episode(dm.hparams.seed, 0, 3)  # seeded: the same run twice
    assert torch.equal(again["query"], dataset.episode(dm.hparams.seed, 0, 3)["query"])
    with pytest.raises(ValueError, match="No alphabet of this pool has 8 characters"):
        datamodule(small_sets, test_alphabets=["Delta", "Beta"], test_way=8).setup("test")


def test_within_alphabet_training_episodes_turn_whole_episodes(small_sets):
    dm = datamodule(small_sets, test_alphabets=["Delta"], train_within_alphabet=True, train_way=5, train_query=2)
    dm.setup("fit")
    dataset, table = dm.train_set, dm.train_set.table
    turns = set()
    for epoch in range(2):
        for index in range(len(dataset)):
            episode = dataset.episode(3, epoch, index)
            assert len({table.alphabets[int(c)] for c in episode["classes"][:, 0]}) == 1
            turn = episode["classes"][:, 1]
            assert (turn == turn[0]).all()  # one quarter turn for the whole episode
            turns.add(int(turn[0]))
            # the images are the characters' drawings turned by that quarter turn
            rows = [int(torch.nonzero((dataset.views == image).flatten(1).all(1))[0]) for image in episode["support"]]
            assert all(row // len(table.images) == int(turn[0]) for row in rows)
    assert len(turns) > 1  # over 16 episodes, more than one turn is drawn
    # Without rotations, nothing turns; test episodes never do.
    plain = datamodule(small_sets, test_alphabets=["Delta"], train_within_alphabet=True, train_way=5, rotations=False)
    plain.setup("fit")
    assert all((plain.train_set.episode(3, 0, i)["classes"][:, 1] == 0).all() for i in range(8))
    with pytest.raises(ValueError, match=r"No alphabet of this pool has 8 characters.*train_way"):
        datamodule(small_sets, test_alphabets=["Delta"], train_within_alphabet=True, train_way=8).setup("fit")


def test_mirrors_add_the_mirrored_symmetries_of_whole_episodes(small_sets):
    assert symmetry_ids(True, True) == tuple(range(8)) and symmetry_ids(False, True) == (0, 4)
    assert symmetry_ids(True, False) == (0, 1, 2, 3) and symmetry_ids(False, False) == (0,)
    image = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(dihedral(image, 4), image.flip(-1)) and torch.equal(dihedral(image, 0), image)
    assert torch.equal(dihedral(image, 5), torch.rot90(image.flip(-1), 1, dims=(-2, -1)))
    with pytest.raises(ValueError, match="symmetry 8"):
        dihedral(image, 8)
    dm = datamodule(small_sets, test_alphabets=["Delta"], train_within_alphabet=True, train_way=5, mirrors=True)
    dm.setup("fit")
    dataset, images = dm.train_set, dm.train_set.table.images
    seen = set()
    for index in range(len(dataset)):
        episode = dataset.episode(3, 0, index)
        symmetry = int(episode["classes"][0, 1])
        seen.add(symmetry)
        character = int(episode["classes"][0, 0])
        drawings = images[dataset.table.offsets[character] : dataset.table.offsets[character] + 20]
        support = episode["support"][0]  # a drawing of the first class, transformed by the episode's symmetry
        assert any(torch.equal(support, dihedral(drawing, symmetry)) for drawing in drawings)
    assert seen & {4, 5, 6, 7}  # some episodes are mirrored
    # Across alphabets, mirrored characters are new classes: 8 per character.
    across = datamodule(small_sets, test_alphabets=["Delta"], mirrors=True)
    across.setup("fit")
    assert len(across.train_set.classes) == 8 * len(across.train_set.table.characters)


def test_held_out_alphabets_never_reach_training(small_sets):
    dm = datamodule(small_sets, test_alphabets=["Gamma"])
    dm.setup("fit")
    dm.setup("test")
    train_alphabets = {name.split("/")[0] for name in dm.pools["train"]}
    assert train_alphabets == {"Alpha", "Beta", "Delta"} and len(dm.pools["train"]) == 6 + 6 + 3  # Beta once
    assert {name.split("/")[0] for name in dm.pools["test"]} == {"Gamma"} and dm.val_set is None
    table = dm.train_set.table
    for epoch in range(3):
        for index in range(len(dm.train_set)):
            episode = dm.train_set.episode(7, epoch, index)
            assert not {table.alphabets[int(c)] for c in episode["classes"][:, 0]} & {"Gamma"}
    with pytest.raises(ValueError, match="test_alphabets \\['Omega'\\] are not alphabets"):
        datamodule(small_sets, test_alphabets=["Omega"]).setup("fit")
    # Without test_alphabets the test pool is the evaluation tree (users with images_evaluation).
    dm = datamodule(small_sets)
    dm.setup("test")
    assert {name.split("/")[0] for name in dm.pools["test"]} == {"Zeta", "Eta"} and len(dm.pools["test"]) == 11


def test_augmentation_keeps_shapes_and_is_off_at_evaluation(small_sets):
    augment = BatchAugment(rotation_range=10, shear_range=10, zoom_range=0.15, width_shift_range=0.1,
                           height_shift_range=0.1, fill_mode="constant")  # fmt: skip
    dm = datamodule(small_sets, test_alphabets=["Gamma"], augment=augment)
    dm.setup("fit")
    dm.trainer = trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    episode = dm.train_set.episode(0, 0, 0)
    plain = {key: episode[key].float() / 255 for key in ("support", "query")}
    trainer.training = True
    torch.manual_seed(0)
    augmented = dm.on_after_batch_transfer(dict(episode), 0)
    for key in ("support", "query"):
        assert augmented[key].shape == plain[key].shape and augmented[key].dtype == torch.float32
        assert augmented[key].min() >= 0 and augmented[key].max() <= 1
        changed = (augmented[key] - plain[key]).abs().flatten(1).amax(1) > 0.1
        assert changed.float().mean() > 0.9  # (almost) every image moved
    for stage in ("validating", "testing", "predicting"):
        setattr(trainer, stage, True)
        evaluated = dm.on_after_batch_transfer(dict(episode), 0)
        assert all(torch.equal(evaluated[key], plain[key]) for key in ("support", "query"))


def test_drawings_fitted_to_their_strokes(small_sets, tmp_path):
    page = np.full((105, 105), 255, np.uint8)
    page[10:30, 5:15] = 0  # black strokes 20 tall and 10 wide, small in a corner of a white page
    Image.fromarray(page).convert("1").save(tmp_path / "0001_01.png")
    rows, cols = np.nonzero(load_image(tmp_path / "0001_01.png", 28, fit_strokes=0.5) > 127)
    assert rows.max() - rows.min() + 1 == 14 and 6 <= cols.max() - cols.min() + 1 <= 8  # 0.5 x 28 tall, aspect kept
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 1
    rows, cols = np.nonzero(load_image(tmp_path / "0001_01.png", 28) > 127)
    assert rows.max() < 9 and cols.max() < 5  # without fitting: the page resized, strokes still in the corner
    Image.new("1", (105, 105), 1).save(tmp_path / "0001_02.png")
    assert not load_image(tmp_path / "0001_02.png", 28, fit_strokes=0.5).any()  # a blank page stays blank
    # The cache keeps fitted and unfitted drawings apart, so switching the option never reads stale images.
    tree = small_sets / "omniglot-py" / "images_background_small1"
    whole = load_tree(tree, cache_dir=tmp_path, write_cache=True)
    fitted = load_tree(tree, cache_dir=tmp_path, write_cache=True, fit_strokes=0.9)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(whole.images, fitted.images)
    assert torch.equal(load_tree(tree, cache_dir=tmp_path, fit_strokes=0.9).images, fitted.images)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="fraction of the frame"):
            OmniglotDataModule(data_dir=str(small_sets), fit_strokes=bad)


def test_encoder_widths_per_block():
    encoder = ProtoNetEncoder(1, [8, 16, 32, 48])
    assert encoder(torch.zeros(3, 1, 28, 28)).shape == (3, 48)
    assert [block[0].out_channels for block in list(encoder)[:4]] == [8, 16, 32, 48]
    with pytest.raises(ValueError, match="at least one block"):
        ProtoNetEncoder(1, [])


def test_shift_averaging_blurs_a_point_over_every_shift_in_the_radius():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    flat = torch.nn.Flatten()
    assert torch.equal(shift_averaged(flat, image, 0), flat(image))
    blurred = shift_averaged(flat, image, 1).view(9, 9)  # 9 views: the point lands on each of its 3 x 3 neighbours
    expected = torch.zeros(9, 9)
    expected[3:6, 3:6] = 1 / 9
    torch.testing.assert_close(blurred, expected)
    assert torch.count_nonzero(shift_averaged(flat, image, 2)) == 25
    with pytest.raises(ValueError, match="radius=-1"):
        shift_averaged(flat, image, -1)


def test_protonet_averages_embeddings_over_shifts_only_at_evaluation():
    torch.manual_seed(0)
    model = ProtoNet(num_classes=3, filters=[4, 8, 8, 8], tta_shift=1)
    support, query = torch.zeros(3, 1, 28, 28), torch.zeros(6, 1, 28, 28)
    support[:, :, 4:24, 4:24] = torch.rand(3, 1, 20, 20)  # a blank border: shifting by rolling is then exact
    query[:, :, 4:24, 4:24] = torch.rand(6, 1, 20, 20)
    labels = torch.arange(3)
    episode = {"support": support, "support_labels": labels, "query": query, "query_labels": torch.arange(6) % 3}

    def embed(images):  # the mean embedding of the 9 copies shifted by -1, 0 or 1 pixel in x and y
        views = [model(images.roll((dy, dx), dims=(-2, -1))) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        return torch.stack(views).mean(0)

    model.eval()
    with torch.no_grad():
        expected = -squared_euclidean(embed(query), prototypes(embed(support), labels, 3))
        with_tta = model.logits(episode)
        torch.testing.assert_close(with_tta, expected)
        model.tta_shift = 0
        assert not torch.allclose(with_tta, model.logits(episode))
        model.tta_shift = 1
    model.train()
    assert torch.equal(model.embed(support), model(support))  # training sees each image once
    with pytest.raises(ValueError, match="tta_shift=-1"):
        ProtoNet(tta_shift=-1)


def test_protonet_averages_distances_over_the_symmetries_of_the_episode():
    torch.manual_seed(0)
    model = ProtoNet(num_classes=3, filters=[4, 8, 8, 8], tta_symmetries=8).eval()
    support, query, labels = torch.rand(3, 1, 28, 28), torch.rand(6, 1, 28, 28), torch.arange(3)
    episode = {"support": support, "support_labels": labels, "query": query, "query_labels": torch.arange(6) % 3}
    with torch.no_grad():
        # the mean over the 8 views (support and query turned/mirrored alike) of each view's squared distances
        views = [(dihedral(support, k), dihedral(query, k)) for k in range(8)]
        distances = [squared_euclidean(model(q), prototypes(model(s), labels, 3)) for s, q in views]
        torch.testing.assert_close(model.logits(episode), -torch.stack(distances).mean(0))
        model.tta_symmetries = 4
        torch.testing.assert_close(model.logits(episode), -torch.stack(distances[:4]).mean(0))
        model.tta_symmetries = 1
        torch.testing.assert_close(model.logits(episode), -distances[0])
    model.train()
    model.tta_symmetries = 8
    assert torch.equal(model.embed(support), model(support))  # training is unchanged
    with pytest.raises(ValueError, match="tta_symmetries=2"):
        ProtoNet(tta_symmetries=2)
    with pytest.raises(ValueError, match=r"square images; input_shape is \[1, 28, 32\]"):
        ProtoNet(tta_symmetries=4, input_shape=(1, 28, 32))


def test_centred_sets_remove_a_style_that_every_query_shares():
    torch.manual_seed(0)
    model = ProtoNet(num_classes=4, centre_sets=True)
    model.encoder = torch.nn.Flatten()  # embeddings are the pixels: a style offset of the images is one of theirs
    support, order = torch.rand(4, 1, 28, 28), torch.tensor([2, 0, 3, 1])
    query = support[order] + 20.0  # another drawer: the same characters, all offset alike
    episode = {"support": support, "support_labels": torch.arange(4), "query": query, "query_labels": order}
    model.eval()
    s, q = support.flatten(1), query.flatten(1)
    expected = -squared_euclidean(q - q.mean(0), s - s.mean(0))
    torch.testing.assert_close(model.logits(episode), expected)
    assert torch.equal(model.logits(episode).argmax(-1), order)  # centred: every query right
    model.centre_sets = False
    assert not torch.equal(model.logits(episode).argmax(-1), order)  # the offset misleads plain distances
    model.train()
    model.centre_sets = True
    torch.testing.assert_close(model.logits(episode), -squared_euclidean(q, s))  # training is unchanged
    model.eval()
    with pytest.raises(ValueError, match="3 queries for 4 classes"):
        model.logits({**episode, "query": query[:3], "query_labels": order[:3]})


def test_all_pairs_makes_every_column_the_support_of_every_other():
    torch.manual_seed(0)
    model = ProtoNet(num_classes=3, all_pairs=True)
    model.encoder = torch.nn.Flatten()  # embeddings are the pixels
    grid = torch.rand(3, 4, 1, 28, 28)  # 3 classes x (a support drawing, then 3 queries)
    labels = torch.arange(3)
    episode = {"support": grid[:, 0], "support_labels": labels, "query": grid[:, 1:].reshape(9, 1, 28, 28),
               "query_labels": labels.repeat_interleave(3)}  # fmt: skip
    logits, targets = model.column_pair_logits(episode)
    assert logits.shape == (12 * 3, 3) and torch.equal(targets, labels.repeat(12))  # 4 x 3 ordered column pairs
    column = [grid[:, i].flatten(1) for i in range(4)]
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]  # (drawings of column i, support column j)
    each = [F.cross_entropy(-squared_euclidean(column[i], column[j]), labels) for i, j in pairs]
    torch.testing.assert_close(F.cross_entropy(logits, targets), torch.stack(each).mean())
    # without all_pairs the support column scores every query column; the first of those is pair (1, 0), rows 9-11
    torch.testing.assert_close(logits[9:12], model.logits({**episode, "query": grid[:, 1], "query_labels": labels}))
    two_shot = {**episode, "support": grid[:, :2].reshape(6, 1, 28, 28), "support_labels": labels.repeat_interleave(2)}
    with pytest.raises(
        ValueError, match=r"6 support and 9 query drawings for 3 classes\. Set --data\.init_args\.train_shot 1"
    ):
        model.column_pair_logits(two_shot)


def test_fast_config_fits_tests_within_alphabet_and_resumes(small_sets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs" / "omniglot" / "fast.yaml"), "--data.init_args.data_dir", str(small_sets),
              "--data.init_args.cache_dir", str(small_sets / "cache"), "--data.init_args.train_way", "5",
              "--model.init_args.num_classes", "5", "--data.init_args.train_episodes", "3",
              "--data.init_args.test_way", "5", "--data.init_args.test_episodes", "4",
              "--data.init_args.test_alphabets", "[Gamma]", "--model.init_args.filters", "[8, 16, 16, 32]",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--curves", "null"]  # fmt: skip
    length = ["--model.init_args.lr_scheduler.init_args.total_steps", "6"]  # the resumed run's, set from the start
    cli = main(["fit", *common, *length, "--trainer.max_epochs", "1"])
    assert cli.datamodule.hparams.test_within_alphabet and cli.datamodule.augment.rotation_range > 0
    assert cli.datamodule.hparams.train_within_alphabet and cli.model.tta_symmetries == 8 and cli.model.all_pairs
    assert cli.trainer.callback_metrics["test/episodes"] == 4 and 0 <= cli.trainer.callback_metrics["test/acc"] <= 1
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert load_model(str(last), None)[1]["fit_strokes"] == 0.86  # few_shot_predict fits new drawings as in training
    # Resume: the run continues from its 3 steps to 6 (not from scratch), then tests on the evaluation tree.
    cli = main(["fit", *common, *length, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6 and cli.trainer.current_epoch == 2
    assert Path(cli.trainer.log_dir) == last.parents[1]
    # A test may change the test-time views of a trained checkpoint; what shapes the weights comes from it.
    test = main(["test", *common, "--ckpt_path", "last", "--model.init_args.tta_symmetries", "1"])
    assert test.model.tta_symmetries == 1 and "test/acc" in test.trainer.callback_metrics
    wider = ["--model.init_args.filters", "[8, 16, 16, 64]", "--model.init_args.tta_shift", "1"]
    test = main(["test", *common, "--ckpt_path", str(last), *wider])
    assert test.model.tta_shift == 1 and test.model.hparams.filters == [8, 16, 16, 32]
    # Without total_steps (the config's way), the one-cycle schedule spans the run: epochs x training episodes.
    cli = main(["fit", *common, "--trainer.max_epochs", "2", "--experiment", "auto_length"])
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == 2 * 3 == cli.trainer.global_step
