"Dice/IoU in both conventions against sklearn and torchmetrics; the segmentation loss."
import warnings
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, jaccard_score
from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

from reclmis_nb.metrics import SegScoreAccumulator, seg_loss, seg_scores, soft_dice_loss


def random_batch(seed, b=8, size=12):
    "Probabilities and masks with an empty prediction, an empty mask and an empty/empty image"
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(b, 1, size, size, generator=g)
    targets = (torch.rand(b, 1, size, size, generator=g) > torch.rand(1, generator=g)).float()
    probs[1] = 0.                       # empty prediction
    targets[2] = 0.                     # empty mask
    probs[3], targets[3] = 0., 0.       # both empty
    return probs, targets


def sklearn_per_image(probs, targets):
    "Per-image F1 (= Dice without the 1e-5) and foreground Jaccard, as the release computes them"
    p = (probs > 0.5).numpy().reshape(len(probs), -1).astype(int)
    t = targets.numpy().reshape(len(targets), -1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return (np.array([f1_score(a, b) for a, b in zip(t, p)]),
                np.array([jaccard_score(a, b) for a, b in zip(t, p)]))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_per_image_matches_sklearn(seed):
    probs, targets = random_batch(seed)
    f1, iou = sklearn_per_image(probs, targets)
    res = seg_scores(probs, targets)
    assert res['n'] == 8 and res['n_empty'] == 1
    assert res['dice'] == pytest.approx(f1.mean(), abs=1e-6)
    assert res['iou'] == pytest.approx(iou.mean(), abs=1e-6)
    # the release's test formula, literally, in float32
    lit = [2 * np.sum(t * p) / (np.sum(t) + np.sum(p) + 1e-5)
           for t, p in zip(targets.numpy().astype(np.float32), (probs > 0.5).numpy().astype(np.float32))]
    assert res['dice'] == pytest.approx(np.mean(lit), abs=1e-6)


@pytest.mark.parametrize('seed', [0, 5, 9])
def test_global_matches_torchmetrics(seed):
    probs, targets = random_batch(seed)
    res = seg_scores(probs[:, 0], targets)            # (B,H,W) probabilities with (B,1,H,W) masks
    assert res['dice_global'] == pytest.approx(binary_f1_score(probs, targets.long()).item(), abs=1e-6)
    assert res['iou_global'] == pytest.approx(binary_jaccard_index(probs, targets.long()).item(), abs=1e-6)


@pytest.mark.parametrize('seed', [0, 4])
def test_empty_rules(seed):
    probs, targets = random_batch(seed)
    f1, iou = sklearn_per_image(probs, targets)
    keep = np.ones(8, bool); keep[3] = False
    one = seg_scores(probs, targets, empty='one')
    skip = seg_scores(probs, targets, empty='skip')
    f1_one, iou_one = f1.copy(), iou.copy(); f1_one[3] = iou_one[3] = 1.
    assert one['dice'] == pytest.approx(f1_one.mean(), abs=1e-6)
    assert one['iou'] == pytest.approx(iou_one.mean(), abs=1e-6)
    assert skip['dice'] == pytest.approx(f1[keep].mean(), abs=1e-6)
    assert skip['iou'] == pytest.approx(iou[keep].mean(), abs=1e-6)
    # the global scores and the validation Dice do not depend on the rule
    zero = seg_scores(probs, targets)
    for k in ('dice_global', 'iou_global', 'dice_val'): assert zero[k] == one[k] == skip[k]
    # the validation Dice is the test Dice with empty='one' up to its 4e-5 smoothing
    assert zero['dice_val'] == pytest.approx(one['dice'], abs=4e-5)


def test_all_empty():
    z = torch.zeros(3, 1, 8, 8)
    assert seg_scores(z, z) == {'dice': 0., 'iou': 0., 'dice_global': 0., 'iou_global': 0., 'dice_val': 1.,
                                'n': 3, 'n_empty': 3}
    assert seg_scores(z, z, empty='one')['dice'] == 1.
    assert np.isnan(seg_scores(z, z, empty='skip')['dice'])


def test_release_validation_dice():
    "dice_val equals 1 - the release's WeightedDiceLoss([0.5, 0.5]) on masks binarised at 0.5"
    probs, targets = random_batch(7)
    p, t = 0.5 * (probs > 0.5).float().flatten(1), 0.5 * targets.flatten(1)
    release = (2 * (p * t).sum(1) + 1e-5) / ((p * p).sum(1) + (t * t).sum(1) + 1e-5)
    assert seg_scores(probs, targets)['dice_val'] == pytest.approx(release.mean().item(), abs=1e-6)


def test_accumulator_streams():
    probs, targets = random_batch(11, b=10)
    acc = SegScoreAccumulator(empty='skip')
    for i in range(0, 10, 3): acc.update(probs[i:i + 3], targets[i:i + 3])
    assert len(acc) == 10
    assert acc.compute() == seg_scores(probs, targets, empty='skip')
    acc.reset()
    acc.update(probs[:2].numpy(), targets[:2].numpy())
    assert acc.compute()['n'] == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match='empty='): seg_scores(torch.rand(1, 4, 4), torch.ones(1, 4, 4), empty='x')
    with pytest.raises(ValueError, match='empty='): SegScoreAccumulator(empty='none')
    with pytest.raises(ValueError, match='resize'): seg_scores(torch.rand(2, 4, 4), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match=r'\(B,1,H,W\)'): seg_scores(torch.rand(2, 2, 4, 4), torch.ones(2, 2, 4, 4))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_seg_loss(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4, 1, 10, 10, generator=g)
    masks = (torch.rand(4, 10, 10, generator=g) > 0.5).float()
    p, t = torch.sigmoid(logits.double()).flatten(1), masks.flatten(1).double()
    dice = 1 - (2 * (p * t).sum(1) + 1e-5) / ((p ** 2).sum(1) + (t ** 2).sum(1) + 1e-5)
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert soft_dice_loss(logits, masks).item() == pytest.approx(dice.mean().item(), abs=1e-6)
    assert seg_loss(logits, masks).item() == pytest.approx(0.5 * dice.mean().item() + 0.5 * bce.item(), abs=1e-6)
    # same function as the release's sigmoid head + BCE on probabilities (which loses float32 precision
    # when the sigmoid saturates: compare on moderate logits)
    small = logits / 3
    ref = 0.5 * soft_dice_loss(small, masks) + 0.5 * F.binary_cross_entropy(torch.sigmoid(small), masks[:, None])
    assert seg_loss(small, masks).item() == pytest.approx(ref.item(), abs=1e-6)
