"""fastdiff.training's image folders as users hand them over: 16-bit PNGs, camera JPEGs, symlinked class
folders, macOS litter, unreadable files, empty class folders; class names kept with the checkpoint."""
import json
import os

import pytest
import torch

from fastdiff.models import UNet
from fastdiff.training import ImageFolder, Trainer

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (pip install pillow)")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(seed=0, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_16bit_greyscale_png_keeps_its_levels(tmp_path):
    # convert("L") clips 16-bit values at 255: everything above 1/256 of full scale came out white (+1)
    arr = np.full((8, 8), 40000, dtype=np.uint16)  # 40000 / 65535 of full scale
    _png(str(tmp_path / "a.png"), arr)
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    for channels in (1, 3):
        x, _ = ImageFolder(str(tmp_path), 8, channels=channels)[0]
        assert torch.allclose(x, torch.full_like(x, 40000 / 65535 * 2 - 1), atol=2 / 255)


def test_exif_orientation_is_applied(tmp_path):
    shown = np.zeros((16, 16), dtype=np.uint8)
    shown[:8] = 255  # as a viewer shows it: top half white
    ex = Image.Exif()
    ex[0x0112] = 6  # "rotate 90 degrees clockwise to display": the camera stored it turned the other way
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "photo.JPG", exif=ex, quality=95)
    x, _ = ImageFolder(str(tmp_path), 8, channels=1)[0]
    assert (x[0, :3] > 0.8).all() and (x[0, -3:] < -0.8).all()


def test_symlinked_class_folders_are_followed(tmp_path):
    real = tmp_path / "elsewhere" / "cat"
    _png(str(real / "1.png"), _rgb(1))
    _png(str(real / "2.png"), _rgb(2))
    root = tmp_path / "data"
    _png(str(root / "dog" / "1.png"), _rgb(3))
    try:
        os.symlink(real, root / "cat", target_is_directory=True)
        # a link up the tree must neither loop nor add the images again
        os.symlink(root, root / "dog" / "loop", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks on this filesystem")
    d = ImageFolder(str(root), 8)
    assert d.class_names == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1] and len(d) == 3


def test_hidden_files_and_folders_are_skipped(tmp_path):
    for cls in ("a", "b"):
        _png(str(tmp_path / cls / "x.png"), _rgb())
    (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, no PNG
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _png(str(tmp_path / ".thumbnails" / "x.png"), _rgb())  # would have been a class
    _png(str(tmp_path / "__MACOSX" / "a" / "._x.png"), _rgb())
    d = ImageFolder(str(tmp_path), 8)
    assert d.class_names == ["a", "b"] and len(d) == 2
    for i in range(len(d)):
        assert d[i][0].shape == (3, 8, 8)


def test_unreadable_image_raises_naming_the_file(tmp_path):
    _png(str(tmp_path / "ok.png"), _rgb())
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    d = ImageFolder(str(tmp_path), 8)
    with pytest.raises(ValueError, match=r"dataset: cannot read the image '.*broken\.jpg'"):
        d[d.files.index(str(tmp_path / "broken.jpg"))]


def test_empty_class_folder_raises(tmp_path):
    # silently dropping it numbered the classes after it one lower, until it got images
    for cls in ("a", "c"):
        _png(str(tmp_path / cls / "x.png"), _rgb())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("todo")
    with pytest.raises(ValueError, match=r"class folder '.*b' holds no images"):
        ImageFolder(str(tmp_path), 8)


def _tiny(num_classes):
    return UNet(image_size=8, in_channels=3, model_channels=8, out_channels=3, num_res_blocks=1,
                attention_resolutions=(4,), channel_mult=(1, 2), num_groups=4, num_classes=num_classes)


def test_class_names_are_saved_and_checked_on_resume(tmp_path):
    import shutil

    data_dir, run = tmp_path / "data", str(tmp_path / "run")
    for i, cls in enumerate(("ant", "cat", "dog")):
        _png(str(data_dir / cls / "1.png"), _rgb(i))
    Trainer(_tiny(3), ImageFolder(str(data_dir), 8), batch_size=2, out_dir=run).train(1)
    meta = json.loads(open(os.path.join(run, "checkpoint.json")).read())
    assert meta["class_names"] == ["ant", "cat", "dog"]
    Trainer.from_checkpoint(run, ImageFolder(str(data_dir), 8))  # same classes: resumes
    # a class removed renumbers the ones after it: cat would become 0, the label ant was trained with
    shutil.rmtree(data_dir / "ant")
    with pytest.raises(ValueError, match=r"dataset: the run was trained on the classes \['ant', 'cat'"):
        Trainer.from_checkpoint(run, ImageFolder(str(data_dir), 8))


def test_cli_cfg_dropout_on_an_unlabelled_folder_names_the_flag(tmp_path, capsys):
    from fastdiff.cli import main

    _png(str(tmp_path / "data" / "x.png"), _rgb())
    _png(str(tmp_path / "data" / "sub" / "y.png"), _rgb(1))  # one image outside a subfolder: unlabelled
    rc = main(["train", "--dataset", str(tmp_path / "data"), "--image-size", "8", "--out",
               str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--model-channels", "8",
               "--num-groups", "4", "--cfg-dropout", "0.1", "--quiet", "--device", "cpu"])
    assert rc == 2 and not os.path.exists(tmp_path / "run" / "checkpoint.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --cfg-dropout:" in err[0] and "has no labels" in err[0], err


def test_plain_labelled_datasets_train_class_conditional_models_with_their_labels_checked(tmp_path):
    # an (image, label) TensorDataset was refused for a class-conditional model ("the dataset has no labels": only
    # a num_classes attribute counted), and labels outside the classes trained silently
    from torch.utils.data import TensorDataset

    from fastdiff.models import NoisyClassifier
    from fastdiff.training.trainer import ClassifierTrainer

    torch.manual_seed(0)
    imgs = torch.rand(6, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    t = Trainer(_tiny(3), TensorDataset(imgs, labels), batch_size=2, out_dir=str(tmp_path / "a"), ema_decay=None)
    t.train(2)
    assert t.step == 2
    clf = NoisyClassifier(8, 3, 8, 3, 1, channel_mult=(1, 2), num_groups=4, pool="adaptive")
    ct = ClassifierTrainer(clf, TensorDataset(imgs, labels), batch_size=2, out_dir=str(tmp_path / "c"))
    ct.train(1)
    assert ct.step == 1
    with pytest.raises(ValueError, match="^dataset: the model is class-conditional but the dataset has no labels"):
        Trainer(_tiny(3), TensorDataset(imgs), batch_size=2, out_dir=str(tmp_path / "b"))
    bad = TensorDataset(imgs, torch.tensor([0, 1, 2, 3, 1, 2]))  # label 3 of a 3-class model
    with pytest.raises(ValueError, match=r"^dataset: item 3 has label 3, outside 0..2 \(the 3 classes of the model"):
        Trainer(_tiny(3), bad, batch_size=6, out_dir=str(tmp_path / "d")).train(1)
    declared = TensorDataset(imgs, labels)
    declared.num_classes = 2  # says 2 classes, holds a label 2
    with pytest.raises(ValueError, match=r"outside 0..1 \(the 2 classes of the dataset\)"):
        Trainer(_tiny(3), declared, batch_size=6, out_dir=str(tmp_path / "e")).train(1)


def test_cli_resume_of_a_greyscale_folder_run_needs_no_channels_flag(tmp_path):
    # resuming a --channels 1 folder run without the flag loaded the images as RGB: "model: in_channels=1 but
    # the data have 3 channels", naming no flag
    from fastdiff.training.cli import _run_channels, train_main

    data_dir, run = tmp_path / "data", str(tmp_path / "run")
    for i, cls in enumerate(("a", "b")):
        _png(str(data_dir / cls / "1.png"), _rgb(i))
    common = ["--dataset", str(data_dir), "--out", run, "--batch-size", "2", "--model-channels", "8",
              "--num-groups", "4", "--num-res-blocks", "1", "--channel-mult", "1,2", "--quiet", "--device", "cpu"]
    assert train_main(common + ["--image-size", "8", "--channels", "1", "--steps", "1"]) == 0
    assert train_main(common + ["--steps", "2"]) == 0  # the run's size and channels
    meta = json.loads(open(os.path.join(run, "checkpoint.json")).read())
    assert meta["step"] == 2 and meta["image_shape"] == [1, 8, 8]
    del meta["image_shape"]  # a checkpoint from before: the model's in_channels
    assert _run_channels(meta) == 1


def test_unreadable_image_mid_run_saves_the_steps_done(tmp_path):
    # a data error stopped training without a checkpoint (Ctrl-C saves one): every step since the last save was
    # lost. The failed step has not started, so the steps done are saved and the run resumes once the file is fixed
    data_dir, run = tmp_path / "data", str(tmp_path / "run")
    for i in range(4):
        _png(str(data_dir / "a" / f"{i}.png"), _rgb(i))
    ds = ImageFolder(str(data_dir), 8)
    with open(data_dir / "a" / "3.png", "wb") as f:
        f.write(b"not a png")  # broken after the folder was listed (as a file damaged mid-run)
    t = Trainer(_tiny(None), ds, batch_size=2, out_dir=run, ema_decay=None)
    with pytest.raises(Exception, match="3.png"):
        t.train(10)
    meta = json.loads(open(os.path.join(run, "checkpoint.json")).read())
    assert meta["step"] == t.step > 0
    _png(str(data_dir / "a" / "3.png"), _rgb(3))
    resumed = Trainer.from_checkpoint(run, ImageFolder(str(data_dir), 8))
    assert resumed.step == t.step
    resumed.train(resumed.step + 1)
