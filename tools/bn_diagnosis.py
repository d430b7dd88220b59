#!/usr/bin/env python
"""Is a validation dip BatchNorm's running statistics? Valid Dice of one checkpoint three ways.

    python tools/bn_diagnosis.py CHECKPOINT DATA [--batches 41] [--threads 2]

1. as saved: BatchNorm in eval mode with the checkpoint's running averages (what the run's validation measured);
2. precise: the statistics reset and recomputed as the plain mean over the first `--batches` train batches (16
   images each, in order) with the checkpoint's weights, every other layer in eval mode (`learner.recompute_bn`,
   what `learner.PreciseBN` does over items spread across the training set);
3. per batch: each validation batch of 16 normalised with its own statistics (BatchNorm in train mode).
If 2 and 3 are far above 1, the weights are fine and the running averages are stale. Also prints the largest
change of a running mean, in units of its running standard deviation.
"""
import argparse, os, sys
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

def main(argv=None):
    ap = argparse.ArgumentParser(prog='bn_diagnosis.py', description=__doc__.splitlines()[0])
    ap.add_argument('checkpoint'); ap.add_argument('data')
    ap.add_argument('--batches', type=int, default=41); ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from reclmis_nb.evaluation import load_checkpoint, score
    from reclmis_nb.batches import CaptionFeatures, WithTextFeatures
    from reclmis_nb.learner import recompute_bn
    from reclmis_nb.data import read_dataset
    from reclmis_nb.dataset import LangSegDataset
    from reclmis_nb.release import model_input
    torch.set_num_threads(a.threads)
    model, info = load_checkpoint(a.checkpoint, 'cpu')
    index = read_dataset(a.data)
    valid = index.splits['valid']
    model.eval()
    with torch.no_grad(): saved = score(model, valid)['dice']
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    old = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    train = index.splits['train']
    feats = CaptionFeatures(model.text_encoder, {s.caption for s in train})
    dl = torch.utils.data.DataLoader(WithTextFeatures(LangSegDataset(train, size=model.cfg.image_size), feats), batch_size=16)
    recompute_bn(model, ((model_input(img, model.cfg), f, m) for _, (img, f, m, mask) in zip(range(a.batches), dl)),
                 torch.device('cpu'))
    with torch.no_grad(): precise = score(model, valid)['dice']
    shift = max(float(((b.running_mean - o[0]).abs() / o[1].sqrt().clamp_min(1e-3)).max()) for b, o in zip(bns, old))
    for b in bns: b.train()
    with torch.no_grad(): per_batch = score(model, valid)['dice']
    print(f'{a.checkpoint}: epoch {info["epochs_done"]}, {len(bns)} BatchNorm layers, {len(valid)} valid images')
    print(f'valid Dice: as saved {saved:.4f}, precise ({a.batches} train batches) {precise:.4f}, per batch {per_batch:.4f}')
    print(f'largest running-mean change: {shift:.3f} running standard deviations')
    return 0

if __name__ == '__main__':
    sys.exit(main())
