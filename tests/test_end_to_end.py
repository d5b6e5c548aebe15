"""The issues' "done when" paths through the documented commands: a folder dataset made by
someone else trains and evaluates, and the exported graph's labels equal the saved
predictions of `training.evaluate --save-preds` on the same images."""

import json

import cv2
import numpy as np
import onnxruntime as ort

from export import to_onnx
from medoe.data import FolderDataset
from training import evaluate, train


def write_folder_dataset(root, rng):
    # Another team's data: a long tail of four classes, jpg and png inputs, odd sizes.
    root.mkdir()
    (root / "classes.txt").write_text("background\nbox\npole\nsign\n\n")
    for split, count in (("train", 6), ("val", 3)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            h, w = int(rng.integers(60, 90)), int(rng.integers(70, 120))
            label = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            label[y:y + h // 3, x:x + w // 3] = 1
            label[:, w - 5:w - 2] = 2
            label[h - 6:h - 2, 2:6] = 3
            label[0, :5] = 255
            image = np.array([40, 200, 120, 250, 0], np.uint8)[np.minimum(label, 4)][..., None].repeat(3, 2)
            suffix = ".jpg" if i % 2 else ".png"
            cv2.imwrite(str(root / "img_dir" / split / f"scene_{i}{suffix}"), image)
            cv2.imwrite(str(root / "ann_dir" / split / f"scene_{i}.png"), label)


def small_config(tmp_path, dataset):
    values = json.loads(open("configs/deeplabv3plus_tiny_synthetic_cpu.json").read())
    values.update(dataset=dataset, synthetic_size=[64, 96], crop_size=[48, 48], synthetic_train_images=8,
                  synthetic_val_images=3, batch_size=2, num_workers=0, decoder_channels=8, decision_hidden=8)
    path = tmp_path / f"{dataset}.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_a_folder_dataset_trains_and_evaluates_from_the_documented_commands(tmp_path):
    root = tmp_path / "their_data"
    write_folder_dataset(root, np.random.default_rng(0))
    work = tmp_path / "run"
    config = small_config(tmp_path, "synthetic")
    assert train.main(["--config", config, "--dataset", "folder", "--data-root", str(root), "--work-dir", str(work),
                       "--iters", "3", "--stage2-iters", "2", "--no-eval"]) == 0
    assert json.loads((work / "final" / "config.json").read_text())["class_names"] == ["background", "box", "pole", "sign"]
    out, preds = tmp_path / "metrics.json", tmp_path / "preds"
    assert evaluate.main(["--checkpoint", str(work / "final"), "--dataset", "folder", "--data-root", str(root),
                          "--split", "val", "--out", str(out), "--save-preds", str(preds)]) == 0
    metrics = json.loads(out.read_text())
    assert [c["name"] for c in metrics["per_class"]] == ["background", "box", "pole", "sign"]
    dataset = FolderDataset(root, "val")
    for i in range(len(dataset)):
        saved = cv2.imread(str(preds / f"{dataset.sample_name(i)}.png"), cv2.IMREAD_UNCHANGED)
        assert saved.shape == dataset.label_map(i).shape


def test_exported_labels_equal_the_saved_predictions(tmp_path):
    work = tmp_path / "run"
    assert train.main(["--config", small_config(tmp_path, "synthetic"), "--work-dir", str(work),
                       "--iters", "3", "--stage2-iters", "2", "--no-eval"]) == 0
    preds = tmp_path / "preds"
    assert evaluate.main(["--checkpoint", str(work / "final"), "--split", "val", "--out", str(tmp_path / "m.json"),
                          "--save-preds", str(preds), "--no-plot"]) == 0
    onnx_path = tmp_path / "repo" / "medoe" / "1" / "model.onnx"
    assert to_onnx.main(["--checkpoint", str(work / "final"), "--out", str(onnx_path)]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from medoe.data import SyntheticStreets

    dataset = SyntheticStreets(num_images=3, height=64, width=96, seed=0, split="val")
    agree = total = 0
    for i in range(len(dataset)):
        image, _ = dataset.load(i)
        labels = session.run(["labels"], {"images": image[None]})[0][0]
        saved = cv2.imread(str(preds / f"{dataset.sample_name(i)}.png"), cv2.IMREAD_UNCHANGED)
        agree += int((labels == saved).sum())
        total += saved.size
    assert agree / total >= 0.9999, f"{total - agree} of {total} pixels differ"
