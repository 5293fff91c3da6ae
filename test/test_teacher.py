"""2D teachers: shapes and strides, torchvision-compatible ResNets, save/load (state dict,
saved teacher, TorchScript), pretrained loading, and a tiny training run on synthetic images."""
import numpy as np
import pytest
import torch

from cmkd_ros.classes import SYNTHETIC
from cmkd_ros.config import ConfigError
from cmkd_ros.models.teacher import (ResNetTrunk, TeacherConfig, TeacherError, Bottleneck,
                                     BasicBlock, build_teacher, convert_torchvision_state_dict,
                                     freeze, load_pretrained, load_teacher, save_teacher)


def tiny_small(**kw):
    return build_teacher({'arch': 'small', 'width': 8, 'feature_dim': 16, 'num_classes': 5,
                          **kw})


@pytest.mark.parametrize('stride', [2, 4, 8])
def test_small_teacher_shapes_and_stride(stride):
    teacher = tiny_small(output_stride=stride).eval()
    images = torch.rand(2, 3, 50, 83)
    feats = teacher.features(images)
    assert teacher.feature_stride == stride
    assert feats.shape == (2, 16, -(-50 // stride), -(-83 // stride))
    assert teacher(images).shape == (2, 5, 50, 83)
    assert isinstance(teacher.classifier, torch.nn.Conv2d)
    assert teacher.classifier.kernel_size == (1, 1)
    # the logits are the classifier applied to the features, then upsampled
    with torch.no_grad():
        direct = torch.nn.functional.interpolate(teacher.classifier(feats), size=(50, 83),
                                                 mode='bilinear', align_corners=False)
        torch.testing.assert_close(teacher(images), direct)
    # uint8 images are the same as [0, 1] floats
    u8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.features(u8), teacher.features(u8.float() / 255))


def test_resnet_trunks_match_torchvision_parameter_counts():
    # torchvision resnet50 / resnet18 have 25,557,032 / 11,689,512 parameters with the
    # 1000-class fc (2048*1000+1000 / 512*1000+1000); our trunks are those without fc.
    r50 = ResNetTrunk(Bottleneck, (3, 4, 6, 3), (False, True, True))
    r18 = ResNetTrunk(BasicBlock, (2, 2, 2, 2), (False, True, True))
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 - 2_049_000
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512 - 513_000
    assert 'layer4.2.conv3.weight' in r50.state_dict()
    assert r50.stride == 8


@pytest.mark.parametrize('arch,stride', [('deeplabv3_resnet18', 8), ('deeplabv3_resnet18', 16)])
def test_deeplab_teacher_strides(arch, stride):
    teacher = build_teacher({'arch': arch, 'feature_dim': 32, 'num_classes': 3,
                             'output_stride': stride}).eval()
    with torch.no_grad():
        feats = teacher.features(torch.rand(1, 3, 64, 96))
    assert feats.shape == (1, 32, 64 // stride, 96 // stride)
    assert teacher.feature_stride == stride


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match='output_stride'):
        build_teacher({'arch': 'small', 'output_stride': 16})
    with pytest.raises(ConfigError, match='arch'):
        build_teacher({'arch': 'vit'})
    with pytest.raises(TeacherError, match='class map has 12 classes'):
        build_teacher({'num_classes': 5}, class_map=SYNTHETIC)
    with pytest.raises(TeacherError, match='3, H, W'):
        tiny_small().features(torch.rand(1, 1, 8, 8))


def test_save_and_load_round_trip(tmp_path):
    teacher = build_teacher({'arch': 'small', 'width': 8, 'feature_dim': 16}, SYNTHETIC).eval()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        expect = teacher(x)
    # saved teacher: config and class map travel in the file
    path = tmp_path / 'teacher.pt'
    save_teacher(teacher, str(path))
    loaded = load_teacher(str(path))
    assert loaded.class_map == SYNTHETIC and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expect)
    # bare state dict needs the config
    bare = tmp_path / 'bare.pt'
    torch.save(teacher.state_dict(), bare)
    with pytest.raises(TeacherError, match='needs a TeacherConfig'):
        load_teacher(str(bare))
    cfg = TeacherConfig(arch='small', width=8, feature_dim=16)
    with torch.no_grad():
        torch.testing.assert_close(load_teacher(str(bare), cfg)(x), expect)
    with pytest.raises(TeacherError, match='do not fit'):
        load_teacher(str(bare), {'arch': 'small', 'width': 8, 'feature_dim': 16,
                                 'num_classes': 4})
    with pytest.raises(TeacherError, match='holds a small teacher'):
        load_teacher(str(path), {'arch': 'small', 'num_classes': 3})
    assert loaded.class_weights is None                 # trained without class weights


def test_training_class_weights_travel_with_the_teacher(tmp_path):
    teacher = build_teacher({'arch': 'small', 'width': 8, 'feature_dim': 16}, SYNTHETIC).eval()
    weights = [0.5 + 0.25 * k for k in range(SYNTHETIC.num_classes)]
    path = tmp_path / 'weighted.pt'
    save_teacher(teacher, str(path), class_weights=weights)
    torch.testing.assert_close(load_teacher(str(path)).class_weights, torch.tensor(weights))
    for bad in (weights[:-1], [0.0] + weights[1:]):
        with pytest.raises(TeacherError, match='positive values'):
            save_teacher(teacher, str(tmp_path / 'bad.pt'), class_weights=bad)


def test_stride_2_adds_a_fine_decoder_step_and_keeps_stride_4_checkpoints(tmp_path):
    """Output stride 2 adds layers (the stem's stride-2 map fused after the stride-4 step);
    the stride-4 model keeps exactly its former parameters, so older teachers still load, and
    a stride-2 teacher round-trips through save and load."""
    four, two = tiny_small(output_stride=4), tiny_small(output_stride=2)
    keys4, keys2 = set(four.state_dict()), set(two.state_dict())
    assert keys4 < keys2
    assert {k.split('.')[1] for k in keys2 - keys4} == {'fine', 'fuse_fine'}
    assert not any('fine' in k for k in keys4)
    path = tmp_path / 'stride2.pt'
    save_teacher(two.eval(), str(path))
    loaded = load_teacher(str(path))
    x = torch.rand(1, 3, 30, 44)
    assert loaded.feature_stride == 2 and loaded.features(x).shape == (1, 16, 15, 22)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), two(x))


@pytest.mark.slow
@pytest.mark.parametrize('stride', [2, 4])
def test_torchscript_teacher(tmp_path, stride):
    teacher = tiny_small(output_stride=stride).eval()
    path = tmp_path / 'teacher_ts.pt'
    torch.jit.script(teacher).save(str(path))
    loaded = load_teacher(str(path))
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), teacher(x))
        torch.testing.assert_close(loaded.features(x), teacher.features(x))
    assert loaded.feature_stride == stride and loaded.feature_dim == 16
    assert loaded.num_classes == 5
    torch.testing.assert_close(loaded.classifier.weight, teacher.classifier.weight)


def test_rejects_non_weights_files(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(TeacherError, match='weights_only'):
        load_teacher(str(bad), {'arch': 'small'})
    with pytest.raises(TeacherError, match='not found'):
        load_teacher(str(tmp_path / 'none.pt'))


def test_torchvision_key_conversion_and_pretrained_backbone(tmp_path):
    source = build_teacher({'arch': 'deeplabv3_resnet18', 'feature_dim': 32,
                            'num_classes': 3})
    # a torchvision-style ImageNet resnet18 state dict: trunk keys without prefix, plus fc
    imagenet = {k[len('backbone.'):]: v.clone() + 1.0 for k, v in source.state_dict().items()
                if k.startswith('backbone.')}
    imagenet['fc.weight'] = torch.zeros(1000, 512)
    imagenet['fc.bias'] = torch.zeros(1000)
    path = tmp_path / 'resnet18_imagenet.pth'
    torch.save(imagenet, path)
    teacher = build_teacher({'arch': 'deeplabv3_resnet18', 'feature_dim': 32,
                             'num_classes': 3, 'pretrained_path': str(path)})
    state = teacher.state_dict()
    torch.testing.assert_close(state['backbone.layer3.1.conv2.weight'],
                               imagenet['layer3.1.conv2.weight'])
    # torchvision deeplabv3 names: classifier.0-3 = head, classifier.4 = 1x1 classifier
    converted = convert_torchvision_state_dict({'classifier.0.convs.0.0.weight': 1,
                                                'classifier.4.weight': 2,
                                                'aux_classifier.0.weight': 3,
                                                'backbone.conv1.weight': 4})
    assert converted == {'head.0.convs.0.0.weight': 1, 'classifier.weight': 2,
                         'backbone.conv1.weight': 4}
    unrelated = tmp_path / 'unrelated.pth'
    torch.save({'encoder.weight': torch.zeros(2)}, unrelated)
    with pytest.raises(TeacherError, match='no parameter matches'):
        load_pretrained(teacher, str(unrelated))


def test_freeze():
    teacher = freeze(tiny_small())
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
def test_tiny_training_reduces_loss_and_beats_chance(tmp_path):
    from fixtures.synthetic import write_sim_pairs
    from offline_training.readers.images import PairImageDataset
    from offline_training.train_teacher import evaluate_teacher, train_teacher
    root = write_sim_pairs(tmp_path / 'pairs', frames=2)
    data = PairImageDataset(root)
    teacher, history = train_teacher(
        {'arch': 'small', 'width': 8, 'feature_dim': 16}, data, steps=24, batch_size=4,
        crop_size=(64, 96), lr=5e-3, log_every=4, device='cpu', class_map=SYNTHETIC, seed=1,
        precision='float32')
    assert len(history['loss']) == 6 and history['step'][-1] == 24
    assert history['loss'][-1] < 0.7 * history['loss'][0]
    assert not teacher.training
    result = evaluate_teacher(teacher, data)
    assert set(result['iou']) == set(SYNTHETIC.names)
    # far better than the majority class alone on the training images
    labels = np.concatenate([data[i]['label'].ravel() for i in range(len(data))])
    labels = labels[labels != 255]
    majority = np.bincount(labels).max() / len(labels)
    assert result['accuracy'] > majority + 0.05


def test_image_augment_keeps_image_and_label_aligned():
    from offline_training.train_teacher import ImageAugment
    # label = column band index; the image encodes the same band in its red channel
    label = np.repeat(np.arange(8, dtype=np.uint8)[None].repeat(6, 1), 30, 0)   # (30, 48)
    image = np.zeros((30, 48, 3), np.uint8)
    image[..., 0] = label * 30
    augment = ImageAugment(crop_size=(40, 40), scale_range=(0.7, 1.3), flip=True,
                           color_jitter=0.0)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(20):
        img, lab = augment(image, label, rng)
        assert img.shape == (40, 40, 3) and lab.shape == (40, 40)
        labeled = lab != 255
        # padding is ignore (255) in the label and black in the image
        assert (img[~labeled] == 0).all()
        # nearest-neighbour labels agree with the bilinear image away from band edges
        agree = (np.abs(img[..., 0][labeled].astype(int) - lab[labeled].astype(int) * 30) <= 15)
        assert agree.mean() > 0.8
        row = lab[0][lab[0] != 255]
        flipped += bool(len(row) > 1 and row[0] > row[-1])
    assert 0 < flipped < 20                      # flips happen, not always
    jitter = ImageAugment(crop_size=None, scale_range=(1.0, 1.0), flip=False, color_jitter=0.4)
    img, lab = jitter(image, label, rng)
    np.testing.assert_array_equal(lab, label)
    assert not np.array_equal(img, image)


def test_class_weights_by_hand():
    from offline_training.train_teacher import TeacherTrainingError, class_weights
    # class 0: 12 pixels, class 1: 3 pixels, class 2: never, 255 ignored
    label = np.array([[0] * 6 + [1] + [255], [0] * 6 + [1, 1]], dtype=np.uint8)
    data = [{'image': np.zeros((2, 8, 3), np.uint8), 'label': label}]
    w = class_weights(data, 3).numpy()
    f = np.array([12, 3]) / 15
    raw = 1 / np.sqrt(f)
    expect = np.append(raw, raw.max()) / (raw * f).sum()
    np.testing.assert_allclose(w, expect, rtol=1e-6)
    assert (class_weights(data, 3, 'none') == 1).all()
    with pytest.raises(TeacherTrainingError, match='unknown class weighting'):
        class_weights(data, 3, 'median')


@pytest.mark.slow
def test_bfloat16_training_reduces_loss_and_float16_needs_cuda(tmp_path):
    from fixtures.synthetic import write_sim_pairs
    from offline_training.readers.images import PairImageDataset
    from offline_training.train_teacher import TeacherTrainingError, train_teacher
    data = PairImageDataset(write_sim_pairs(tmp_path / 'pairs', frames=2))
    cfg = {'arch': 'small', 'width': 8, 'feature_dim': 16}
    teacher, history = train_teacher(
        cfg, data, steps=24, batch_size=4, crop_size=(64, 96), lr=5e-3, log_every=4,
        device='cpu', class_map=SYNTHETIC, seed=1, precision='bfloat16')
    assert history['loss'][-1] < 0.7 * history['loss'][0]
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # autocast, not a cast
    if not torch.cuda.is_available():
        with pytest.raises(TeacherTrainingError, match='float16 needs'):
            train_teacher(cfg, data, steps=1, batch_size=2, device='cpu', precision='float16')
    with pytest.raises(TeacherTrainingError, match='precision must be one of'):
        train_teacher(cfg, data, steps=1, batch_size=2, device='cpu', precision='half')


def test_augmented_images_read_each_image_once_within_the_cache_budget():
    from offline_training.train_teacher import AugmentedImages, ImageAugment

    class Counting:
        reads = 0

        def __len__(self):
            return 3

        def __getitem__(self, i):
            Counting.reads += 1
            return {'image': np.full((4, 8, 3), i, np.uint8),
                    'label': np.full((4, 8), i, np.uint8)}

    item_bytes = 4 * 8 * 3 + 4 * 8
    augment = ImageAugment(crop_size=None, scale_range=(1.0, 1.0), flip=False, color_jitter=0.0)
    cached = AugmentedImages(Counting(), augment, cache_mb=3 * item_bytes / 2 ** 20)
    for _ in range(4):
        for i in range(3):
            image, label = cached[i]
            assert (label == i).all() and torch.allclose(image, torch.full_like(image, i / 255))
    assert Counting.reads == 3
    Counting.reads = 0
    partly = AugmentedImages(Counting(), augment, cache_mb=2 * item_bytes / 2 ** 20)
    for _ in range(4):
        for i in range(3):
            partly[i]
    assert Counting.reads == 2 + 4                   # two cached, the third read every time


def test_rare_class_sampling_centres_crops_on_rare_classes():
    from offline_training.train_teacher import (AugmentedImages, ImageAugment,
                                                TeacherTrainingError)
    # four 20x40 images of class 0; the last has a 2x2 patch of class 1 in a corner
    items = []
    for i in range(4):
        label = np.zeros((20, 40), np.uint8)
        if i == 3:
            label[17:19, 36:38] = 1
        items.append({'image': np.zeros((20, 40, 3), np.uint8), 'label': label})
    augment = ImageAugment(crop_size=(10, 10), scale_range=(1.0, 1.0), flip=False,
                           color_jitter=0.0)
    torch.manual_seed(0)
    plain = AugmentedImages(items, augment)
    rare = AugmentedImages(items, augment, rare_class_sampling=1.0, num_classes=2)
    # class 1 is drawn with probability w1 / (w0 + w1), w = 1 / sqrt(pixel frequency)
    f1 = 4 / (4 * 800)
    w0, w1 = 1 / np.sqrt(1 - f1), 1 / np.sqrt(f1)
    np.testing.assert_allclose(rare._class_probability, [w0 / (w0 + w1), w1 / (w0 + w1)])
    hits_plain = sum(bool((plain[i % 4][1] == 1).any()) for i in range(60))
    hits_rare = sum(bool((rare[i % 4][1] == 1).any()) for i in range(60))
    assert hits_plain <= 6 and hits_rare >= 50, (hits_plain, hits_rare)
    with pytest.raises(TeacherTrainingError, match='needs num_classes'):
        AugmentedImages(items, augment, rare_class_sampling=0.5)
    with pytest.raises(TeacherTrainingError, match=r'must lie in \[0, 1\]'):
        AugmentedImages(items, augment, rare_class_sampling=1.5, num_classes=2)


def test_typed_config_and_keyword_settings_train_the_same_teacher(tmp_path):
    """train_teacher(TeacherTrainConfig) and the keyword form (old names included) build the
    same trainer: identical weights and history, bit for bit on one CPU thread."""
    from cmkd_ros.config import build, to_dict
    from fixtures.synthetic import write_sim_pairs
    from offline_training.config import TeacherTrainConfig
    from offline_training.readers.images import PairImageDataset
    from offline_training.train_teacher import TeacherTrainingError, train_teacher
    data = PairImageDataset(write_sim_pairs(tmp_path / 'pairs', frames=2))
    model = {'arch': 'small', 'width': 8, 'feature_dim': 16}
    config = build(TeacherTrainConfig, {
        'steps': 4, 'log_every': 2, 'device': 'cpu', 'precision': 'float32', 'threads': 1,
        'progress': False, 'seed': 3, 'model': model,
        'data': {'batch_size': 2, 'crop_size': [48, 64], 'rare_class_sampling': 0.5},
        'optim': {'lr': 5e-3}, 'loss': {'class_balance': 'inverse_sqrt'}})
    steps = []
    typed, history = train_teacher(config, data, class_map=SYNTHETIC,
                                   callback=lambda step, loss: steps.append(step))
    keywords, again = train_teacher(model, data, class_map=SYNTHETIC, steps=4, log_every=2,
                                    device='cpu', precision='float32', threads=1, seed=3,
                                    batch_size=2, crop_size=(48, 64), rare_class_sampling=0.5,
                                    lr=5e-3, class_weighting='inverse_sqrt')
    assert steps == [1, 2, 3, 4] and history['step'] == again['step'] == [2, 4]
    assert history['loss'] == again['loss'] and history['lr'] == again['lr']
    assert len(set(history['class_weights'])) > 1                   # inverse_sqrt applied
    for key, value in typed.state_dict().items():
        assert torch.equal(value, keywords.state_dict()[key]), key
    # the same names as the config; an unknown one is refused by the config
    with pytest.raises(TeacherTrainingError, match='unknown setting'):
        train_teacher(model, data, steps=1, crop_sise=(48, 64))
    assert to_dict(config)['loss'] == {'class_balance': 'inverse_sqrt'}


def test_one_inverse_sqrt_rule_for_teacher_pixels_and_student_points():
    """loss.class_balance: the teacher's per-class pixel weights and the students' per-point
    weights are the same function of the class counts."""
    from offline_training.losses import class_balance_weights, inverse_sqrt_weights
    from offline_training.train_teacher import class_weights
    labels = np.array([0] * 12 + [1] * 3 + [3] * 1 + [255] * 4, dtype=np.uint8)
    per_class = inverse_sqrt_weights(np.bincount(labels[labels < 4], minlength=4))
    teacher = class_weights([{'image': None, 'label': labels[None]}], 4)
    points = class_balance_weights(torch.from_numpy(labels.astype(np.int64)), 4)
    torch.testing.assert_close(teacher[[0, 1, 3]], per_class[[0, 1, 3]].float())
    assert teacher[2] == teacher.max()                      # never seen: the largest weight
    torch.testing.assert_close(points[:16], per_class[labels[:16].astype(np.int64)].float())
    assert float((per_class * torch.tensor([12, 3, 0, 1]) / 16).sum()) == pytest.approx(1.0)
