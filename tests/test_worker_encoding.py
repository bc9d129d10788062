"""The torch input path's division of work and its fast pixel path.

SSD targets are encoded in the loader workers and uint8 images normalised where the model
trains, with the same values bit for bit as before; ``--color-jitter fused`` keeps the image a
uint8 tensor from the JPEG decode to the batch (the same draws as the Pillow path)."""
from __future__ import annotations

import argparse
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from single_stage_detector.box_coder import BoxCoder, default_boxes
from single_stage_detector.data.batch import DetectionBatch
from single_stage_detector.data.coco import CocoDetection, Sample, find_coco_split, read_rgb
from single_stage_detector.data.loader import DetectionCollate, build_train_loader, collate_detection
from single_stage_detector.data.pipeline import train_collate
from single_stage_detector.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    SSDTrainTransform,
    normalize_images,
    to_normalized_tensor,
)
from single_stage_detector.detectors.base import build_detector, family_of, get_preset


def _random_targets(counts: list[int], gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    boxes, labels = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen) * 0.7
        wh = 0.02 + torch.rand(n, 2, generator=gen) * 0.3
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=1.0)], 1))
        labels.append(torch.randint(1, 81, (n,), generator=gen))
    return boxes, labels


def _tied_targets(anchors_xyxy: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Targets with ties and extremes of the matching.

    Image 0: two identical boxes (every default box has equal IoU with both: the first wins;
    both are forced onto the same default box: the last wins). Image 1: a box equal to a
    default box (IoU exactly 1) and its mirror image about x = 0.5. Image 2: no boxes.
    Image 3: 60 boxes.
    """
    gen = torch.Generator().manual_seed(7)
    same = torch.tensor([[0.2, 0.3, 0.55, 0.7]])
    on_anchor = anchors_xyxy[1000:1001]
    mirror = torch.stack([1 - on_anchor[:, 2], on_anchor[:, 1], 1 - on_anchor[:, 0], on_anchor[:, 3]], 1)
    many, many_labels = _random_targets([60], gen)
    boxes = [torch.cat([same, same]), torch.cat([on_anchor, mirror]).clamp(0, 1), torch.zeros(0, 4), many[0]]
    labels = [torch.tensor([3, 9]), torch.tensor([1, 80]), torch.zeros(0, dtype=torch.int64), many_labels[0]]
    return boxes, labels


# -- normalisation of uint8 batches ----------------------------------------------------------------


def test_normalize_images_bit_identical_to_per_image_normalisation():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(4)]
    arrays[0][:] = 0
    arrays[1][:] = 255  # the extremes of the range
    per_image = torch.stack([to_normalized_tensor(Image.fromarray(a)) for a in arrays])
    uint8 = torch.stack([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays])
    batched = normalize_images(uint8)
    assert batched.dtype == torch.float32 and torch.equal(batched, per_image)
    # Memory format kept (channels-last training), values unchanged.
    cl = normalize_images(uint8.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, per_image)
    # Hand-computed: grey 128 in the red channel is (128 / 255 - 0.485) / 0.229
    # = (0.5019608 - 0.485) / 0.229 = 0.0169608 / 0.229 = 0.0740645.
    grey = normalize_images(torch.full((1, 3, 1, 1), 128, dtype=torch.uint8))
    assert abs(float(grey[0, 0, 0, 0]) - 0.0740645) < 1e-6
    # The training process's thread count is left as it was.
    threads = torch.get_num_threads()
    normalize_images(uint8)
    assert torch.get_num_threads() == threads


def test_normalize_images_rejects_float_or_wrong_channels():
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize_images(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("fused", [False, True])
def test_uint8_train_transform_is_the_float_one_before_normalisation(fused):
    """Same seed, same draws: the uint8 output normalised equals the float output bit for bit."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    boxes, labels = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.4, 0.3, 0.9, 0.95]]), torch.tensor([4, 7])
    ref = SSDTrainTransform(64, 50, rng=np.random.default_rng(5), fused_color=fused)
    new = SSDTrainTransform(64, 50, rng=np.random.default_rng(5), fused_color=fused, normalize=False)
    for _ in range(12):
        img_f, b_f, l_f = ref(image, boxes, labels)
        img_u, b_u, l_u = new(image, boxes, labels)
        assert img_u.dtype == torch.uint8 and img_u.shape == (3, 64, 64) and img_u.is_contiguous()
        assert torch.equal(normalize_images(img_u[None])[0], img_f)
        assert torch.equal(b_u, b_f) and torch.equal(l_u, l_f)


# -- targets encoded in the workers ----------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["ssd_tiny", "ssd300_resnet34"])
def test_collate_encoding_equals_the_detectors(preset_name):
    """The workers' encoding (``train_collate``) gives ``SSDDetector.encode_targets``'s targets
    bit for bit: COCO-like random batches, a 60-box image, an empty image and IoU ties."""
    preset = get_preset(preset_name)
    detector = build_detector(preset)
    collate = train_collate(preset_name, family_of(preset).train_transform(preset, argparse.Namespace(
        max_samples=1, color_jitter="fused")))
    assert isinstance(collate.target_encoder, BoxCoder)
    assert torch.equal(collate.target_encoder.default_boxes, detector.default_boxes)
    assert collate.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    gen = torch.Generator().manual_seed(0)
    batches = [_random_targets([int(n) for n in torch.randint(0, 12, (8,), generator=gen)], gen)
               for _ in range(3)]
    batches.append(_tied_targets(detector.box_coder.default_boxes_xyxy))
    collate = pickle.loads(pickle.dumps(collate))  # as a spawned worker receives it
    for boxes, labels in batches:
        samples = [Sample(image=torch.zeros(3, 4, 4, dtype=torch.uint8), boxes=b, labels=lb, image_id=i,
                          orig_size=(4, 4)) for i, (b, lb) in enumerate(zip(boxes, labels))]
        batch = collate(samples)
        loc, lab = detector.encode_targets(boxes, labels)
        assert torch.equal(batch.encoded[1], lab) and torch.equal(batch.encoded[0], loc)
        assert batch.targets().keys() == {"loc", "labels"}
    # The tie rules really were exercised: of the two identical boxes forced onto one default
    # box the last keeps it (label 9); on SSD300's denser boxes, the other default boxes above
    # IoU 0.5 take the first (label 3).
    lab = batch.encoded[1]
    assert 9 in lab[0].tolist() and (3 in lab[0].tolist()) == (preset_name == "ssd300_resnet34")
    assert 1 in lab[1].tolist() and 80 in lab[1].tolist()
    assert int((lab[2] > 0).sum()) == 0


def test_no_worker_encoding_for_gpu_training():
    """On a GPU the detector encodes on the device (dense, no host synchronisation): the workers
    send raw boxes; the images still travel as uint8."""
    preset = get_preset("ssd_tiny")
    transform = family_of(preset).train_transform(preset, argparse.Namespace(max_samples=1, color_jitter="fused"))
    collate = train_collate(preset.name, transform, "cuda")
    assert collate.target_encoder is None and collate.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(train_collate(preset.name, transform, torch.device("cpu")).target_encoder, BoxCoder)


@pytest.mark.parametrize("uint8", [True, False])
def test_batch_survives_the_trip_between_processes(uint8):
    """A batch pickled as the loader sends it (small tensors and uint8 batches as bytes, float
    images through shared memory) comes back equal, field by field, boxes split per image."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

    gen = torch.Generator().manual_seed(3)
    boxes, labels = _random_targets([3, 0, 5], gen)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=gen)
    coder = BoxCoder(default_boxes(get_preset("ssd_tiny").box_spec))
    batch = DetectionBatch(images=images if uint8 else images.float(), boxes=boxes, labels=labels,
                           image_ids=torch.tensor([4, 5, 6]), orig_sizes=torch.tensor([[8, 9], [10, 11], [12, 13]]),
                           valid=torch.ones(3, dtype=torch.bool), skipped=2, encoded=coder.encode(boxes, labels),
                           normalization=(IMAGENET_MEAN, IMAGENET_STD) if uint8 else None)
    back = ForkingPickler.loads(bytes(ForkingPickler.dumps(batch)))
    assert torch.equal(back.images, batch.images) and back.images.dtype == batch.images.dtype
    assert [b.shape[0] for b in back.boxes] == [3, 0, 5]
    assert all(torch.equal(x, y) for x, y in zip(back.boxes, batch.boxes))
    assert all(torch.equal(x, y) for x, y in zip(back.labels, batch.labels))
    assert torch.equal(back.encoded[0], batch.encoded[0]) and torch.equal(back.encoded[1], batch.encoded[1])
    for name in ("image_ids", "orig_sizes", "valid"):
        assert torch.equal(getattr(back, name), getattr(batch, name))
    assert back.skipped == 2 and back.normalization == batch.normalization


def test_collate_without_encoder_or_normalisation_is_the_plain_one():
    samples = [Sample(image=torch.rand(3, 8, 8), boxes=torch.tensor([[0.1, 0.1, 0.5, 0.5]]),
                      labels=torch.tensor([2]), image_id=1, orig_size=(8, 8)), None]
    a, b = DetectionCollate()(samples), collate_detection(samples)
    assert a.encoded is None and a.normalization is None and a.skipped == 1
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes[0], b.boxes[0])
    # YOLO presets: raw boxes (their loss assigns targets at the step's input size), float images.
    preset = get_preset("yolov3_tiny_cpu")
    collate = train_collate(preset.name, family_of(preset).train_transform(preset, argparse.Namespace(
        max_samples=1, color_jitter="torchvision", input_size=None, multi_scale=None)))
    assert collate.target_encoder is None and collate.normalization is None
    # uint8 images need their normalisation.
    uint8 = [Sample(image=torch.zeros(3, 8, 8, dtype=torch.uint8), boxes=torch.zeros(0, 4),
                    labels=torch.zeros(0, dtype=torch.int64), image_id=1, orig_size=(8, 8))]
    with pytest.raises(ValueError, match="uint8"):
        DetectionCollate()(uint8)
    # An empty batch (every image unreadable) is neither encoded nor normalised.
    empty = DetectionCollate(BoxCoder(default_boxes(get_preset("ssd_tiny").box_spec)),
                             (IMAGENET_MEAN, IMAGENET_STD))([None, None])
    assert len(empty) == 0 and empty.encoded is None and empty.skipped == 2


def test_batch_to_normalises_uint8_images_once():
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    batch = DetectionBatch(images=images, boxes=[torch.zeros(0, 4)] * 2,
                           labels=[torch.zeros(0, dtype=torch.int64)] * 2, image_ids=torch.tensor([1, 2]),
                           orig_sizes=torch.tensor([[6, 6], [6, 6]]), valid=torch.ones(2, dtype=torch.bool),
                           normalization=(IMAGENET_MEAN, IMAGENET_STD))
    moved = batch.to("cpu", memory_format=torch.channels_last)
    assert moved.normalization is None and moved.images.dtype == torch.float32
    assert moved.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved.images, normalize_images(images))
    assert torch.equal(moved.to("cpu").images, moved.images)  # a second move does not normalise again


def test_training_loader_batches_unchanged_with_two_workers(small_coco):
    """End to end: 2 workers encoding and sending uint8 give, after ``to()``, the batches of the
    previous path (float images from the transform, targets encoded in the training process)
    bit for bit, with the same augmentation draws as in-process loading; the workers run one
    intra-op thread."""
    preset = get_preset("ssd_tiny")
    detector = build_detector(preset)
    img_dir, ann = find_coco_split(small_coco, "train2017")
    transform = family_of(preset).train_transform(preset, argparse.Namespace(max_samples=1, color_jitter="fused"))
    assert transform.normalize is False

    class Recording(DetectionCollate):
        def __call__(self, samples):
            batch = super().__call__(samples)
            batch.skipped = torch.get_num_threads()  # the worker's intra-op threads, sent back
            return batch

    collate = train_collate(preset.name, transform)
    dataset = CocoDetection(img_dir, ann, transform=transform)
    new = build_train_loader(dataset, 8, num_workers=2, seed=4,
                             collate_fn=Recording(collate.target_encoder, collate.normalization))
    ref_tf = SSDTrainTransform(preset.input_size, 1, fused_color=True)
    old = build_train_loader(CocoDetection(img_dir, ann, transform=ref_tf), 8, num_workers=0, seed=4)
    for loader in (new, old):
        loader.batch_sampler.set_epoch(2)
    count = 0
    for a, b in zip(new, old):
        assert a.skipped == 1 and a.images.dtype == torch.uint8
        a = a.to("cpu")
        assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.images, b.images)
        loc, lab = detector.encode_targets(b.boxes, b.labels)
        assert torch.equal(a.encoded[0], loc) and torch.equal(a.encoded[1], lab)
        count += len(a)
    assert count == len(dataset) > 50


def test_loader_workers_keep_freed_memory():
    """glibc: the workers' allocator keeps freed memory (the per-sample buffers are reused, not
    faulted in again); elsewhere the call says it did nothing."""
    import platform

    from single_stage_detector.data.loader import retain_freed_memory

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected


# -- the fast pixel path (--color-jitter fused) ----------------------------------------------------


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A photograph-like uint8 RGB image: smooth colour fields plus mild noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(field + rng.integers(-6, 7, field.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey", "4:4:4", "cmyk", "png"])
def test_read_rgb_decodes_as_pillow(tmp_path, kind):
    """torchvision's JPEG decode gives Pillow's pixels bit for bit; what it does not take
    (CMYK, PNG) goes to Pillow."""
    image = Image.fromarray(_smooth_image(45, 61, 0))
    path = tmp_path / ("x.png" if kind == "png" else "x.jpg")
    if kind == "png":
        image.save(path)
    else:
        mode = {"grey": "L", "cmyk": "CMYK"}.get(kind, "RGB")
        extra = {"progressive": {"progressive": True}, "4:4:4": {"subsampling": 0}}.get(kind, {})
        image.convert(mode).save(path, "JPEG", quality=90, **extra)
    decoded = read_rgb(path)
    with Image.open(path) as im:
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 45, 61)
    assert torch.equal(decoded, expected)


def test_read_rgb_raises_as_pillow_on_bad_files(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from dataset_surgery import _oversized_header

    buf = io.BytesIO()
    Image.fromarray(_smooth_image(40, 40, 1)).save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    cases = {"truncated.jpg": (good[: len(good) // 2], OSError),
             "garbage.jpg": (b"\xff\xd8\xff\xe0 not a jpeg", OSError),
             "bomb.jpg": (_oversized_header(good), Image.DecompressionBombError)}  # 20000 x 20000 declared
    for name, (data, error) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(error):
            read_rgb(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_rgb(tmp_path / "missing.jpg")


def test_tensor_colour_twist_is_pillows_up_to_float_rounding():
    """``ColorJitter.apply_tensor`` = Pillow's ``convert("RGB", matrix)`` of the same draws, on random
    images (extremes included) and factors, at the default ranges and at wide ones (clamping),
    but for sums rounded the other way: at most one grey level, a few values in a million."""
    rng = np.random.default_rng(0)
    differ = total = 0
    for seed in range(60):
        arr = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
        arr[:3] = 255
        arr[3:6] = 0
        kw = {} if seed % 2 else dict(brightness=0.6, contrast=0.9, saturation=0.9, hue=0.5)
        pil = np.asarray(ColorJitter(**kw, fused=True, rng=np.random.default_rng(seed))(Image.fromarray(arr)))
        tensor = ColorJitter(**kw, fused=True, rng=np.random.default_rng(seed)).apply_tensor(
            torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 23, 31)
        diff = np.abs(tensor.permute(1, 2, 0).numpy().astype(int) - pil)
        assert diff.max() <= 1, seed
        differ, total = differ + int((diff > 0).sum()), total + diff.size
    assert differ <= 1e-4 * total, (differ, total)  # measured: 5 in 1.2 million
    with pytest.raises(ValueError, match="fused"):
        ColorJitter().apply_tensor(torch.zeros(3, 2, 2, dtype=torch.uint8))


def test_fast_path_same_draws_and_close_pixels_to_the_pillow_path():
    """The tensor path (fused) and the Pillow path draw the same crop windows, flips and colour
    factors from one seed; with colour jitter off, boxes agree within the whole-pixel rounding
    of the window and pixels within bilinear rounding away from the crop border."""
    arr = _smooth_image(240, 320, 2)
    image = Image.fromarray(arr)
    boxes, labels = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.4, 0.3, 0.9, 0.95]]), torch.tensor([4, 7])
    off = dict(brightness=0, contrast=0, saturation=0, hue=0)
    fast = SSDTrainTransform(96, 50, rng=np.random.default_rng(9), fused_color=True, normalize=False, **off)
    assert fast.tensor_input
    pil = SSDTrainTransform(96, 50, rng=np.random.default_rng(9), normalize=False, **off)
    mean_diffs = []
    for _ in range(40):
        img_f, b_f, l_f = fast(torch.from_numpy(arr).permute(2, 0, 1), boxes, labels)
        img_p, b_p, l_p = pil(image, boxes, labels)
        assert torch.equal(l_f, l_p)
        # Box coordinates move by at most half a source pixel, relative to the window (>= 72 px wide).
        assert float((b_f - b_p).abs().max()) <= 0.5 / 72 + 1e-6
        inner = (img_f.int() - img_p.int())[:, 3:-3, 3:-3].abs()
        mean_diffs.append(float(inner.float().mean()))
        assert int(inner.max()) <= 8  # measured: at most 5 (the whole image: 1)
    assert np.mean(mean_diffs) < 1.0, mean_diffs  # measured: 0.4
    # The draws stay aligned: the next random number is the same in both RNGs.
    assert fast.crop.rng.random() == pil.crop.rng.random()
