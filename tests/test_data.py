"Data: the real QaTa subset, broken copies, all four layouts rebuilt from real files, the dataset, synthetic data, download, CLI"
import json, shutil, subprocess, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reclmis_nb.images import DatasetError, load_image, load_mask
from reclmis_nb.captions import caption_zones
from reclmis_nb.synthetic import make_synthetic_dataset
from reclmis_nb.data import DownloadError, check_dataset, download_qata, format_report, read_dataset
from reclmis_nb.augment import hflip
from reclmis_nb.dataset import LangSegDataset


def snapshot(root):
    "Every path under `root` with its mtime and size"
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in Path(root).rglob('*'))


@pytest.fixture
def entries(qata_root):
    "A few real annotation entries per role: (split folder, entry), 6 train, 2 valid, 2 'test' (from valid)"
    ann = json.loads((qata_root/'prompts/annotation.json').read_text())
    train = [e for e in ann['train'] if e['image_path'].startswith('mask_covid')][:4] + \
            [e for e in ann['train'] if e['image_path'].startswith('mask_sub-s')][:2]
    picks = {'train': [('train', e) for e in train], 'valid': [('valid', e) for e in ann['valid'][:2]],
             'test': [('valid', e) for e in ann['valid'][2:4]]}
    return qata_root, picks


def real_files(root, folder, e):
    "(image path, mask path) of one real annotation entry"
    return (root/'images'/folder/'images'/e['image_path'].removeprefix('mask_'), root/'images'/folder/'masks'/e['image_path'])


@pytest.fixture
def small_sgseg(tmp_path, entries):
    "A 10-sample SGSeg-layout copy of real files, plus one identical upper-case twin (SGSeg's quirk)"
    root, picks = entries
    dest, ann = tmp_path/'sgseg', {}
    for split, items in picks.items():
        (dest/'images'/split/'images').mkdir(parents=True); (dest/'images'/split/'masks').mkdir(parents=True)
        ann[split] = []
        for folder, e in items:
            img, mask = real_files(root, folder, e)
            shutil.copy(img, dest/'images'/split/'images'/img.name); shutil.copy(mask, dest/'images'/split/'masks'/mask.name)
            ann[split].append(e)
    twin = next(p for p in (dest/'images/train/images').iterdir() if p.name.startswith('sub-s'))
    shutil.copy(twin, twin.with_name('sub-S' + twin.name[5:]))
    shutil.copy(dest/'images/train/masks'/f'mask_{twin.name}', dest/'images/train/masks'/f'mask_sub-S{twin.name[5:]}')
    (dest/'prompts').mkdir(); (dest/'prompts/annotation.json').write_text(json.dumps(ann))
    return dest


# ---------------------------------------------------------------- the real data
def test_check_real_qata(qata_root):
    before = snapshot(qata_root)
    r = check_dataset(qata_root)
    assert r['layout'] == 'sgseg'
    assert {k: v['n'] for k, v in r['splits'].items()} == {'train': 1800, 'valid': 300}
    assert r['problems'] == []
    assert r['splits']['train']['image_sizes'] == {'224x224': 1800}
    assert r['splits']['valid']['caption_words']['min'] >= 9
    assert snapshot(qata_root) == before       # nothing written, touched or added
    assert 'problems: none' in format_report(r)


def test_case_twin_folded(small_sgseg):
    r = check_dataset(small_sgseg)
    assert r['problems'] == []
    assert r['splits']['train']['n'] == 6 and r['splits']['train']['case_duplicates'] == 2   # image + mask twin
    names = [s.image.name for s in read_dataset(small_sgseg).splits['train']]
    assert len(names) == 6 and not any(n.startswith('sub-S') for n in names)


# ---------------------------------------------------------------- broken copies
def break_mask(root):
    p = next((root/'images/train/masks').glob('mask_covid*'))
    p.unlink(); return p.name

def break_caption(root):
    ann = json.loads((root/'prompts/annotation.json').read_text())
    gone = ann['valid'].pop(0)['image_path']
    (root/'prompts/annotation.json').write_text(json.dumps(ann)); return gone.removeprefix('mask_')

def break_png(root):
    p = sorted((root/'images/test/images').iterdir())[0]
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]); return p.name

def break_orphan_caption(root):
    ann = json.loads((root/'prompts/annotation.json').read_text())
    ann['train'].append(dict(ann['train'][0], image_path='mask_not_there.png'))
    (root/'prompts/annotation.json').write_text(json.dumps(ann)); return 'mask_not_there.png'

def break_duplicate_entry(root):
    ann = json.loads((root/'prompts/annotation.json').read_text())
    ann['train'].append(ann['train'][1])
    (root/'prompts/annotation.json').write_text(json.dumps(ann)); return ann['train'][1]['image_path']

@pytest.mark.parametrize('breaker, word', [(break_mask, 'missing mask'), (break_caption, 'missing caption'),
                                           (break_png, 'unreadable file'), (break_orphan_caption, 'caption with no image'),
                                           (break_duplicate_entry, 'duplicate')])
def test_broken_copy_reported(small_sgseg, breaker, word):
    name = breaker(small_sgseg)
    before = snapshot(small_sgseg)
    r = check_dataset(small_sgseg)
    assert len(r['problems']) == 1, r['problems']
    assert word in r['problems'][0] and name in r['problems'][0]
    assert snapshot(small_sgseg) == before


# ---------------------------------------------------------------- the four layouts, rebuilt from real files
def save_image(src, dst, kind):
    "Re-encode a real 8-bit grayscale image as `kind`: 'gray8', 'gray16' or 'rgb'"
    a = np.asarray(Image.open(src))
    {'gray8': lambda: Image.fromarray(a), 'gray16': lambda: Image.fromarray(a.astype(np.uint16) * 257),
     'rgb': lambda: Image.fromarray(np.stack([a] * 3, -1))}[kind]().save(dst)

def save_mask(src, dst, kind):
    "Re-encode a real 0/255 mask as `kind`: '255', '01', 'palette' or 'rgb'"
    m = np.asarray(Image.open(src)) > 0
    if kind == 'palette':
        im = Image.fromarray(m.astype(np.uint8), 'P'); im.putpalette([0, 0, 0, 255, 255, 255]); im.save(dst)
    elif kind == 'rgb': Image.fromarray(np.stack([m * 255, m * 128, m * 0], -1).astype(np.uint8)).save(dst)
    else: Image.fromarray(m.astype(np.uint8) * (255 if kind == '255' else 1)).save(dst)

def write_table(rows, path):
    "Text table with columns Image, Description as .xlsx or .csv by the suffix of `path`"
    df = pd.DataFrame(rows, columns=['Image', 'Description'])
    df.to_excel(path, index=False) if path.suffix == '.xlsx' else df.to_csv(path, index=False)

KINDS = [('gray8', '255'), ('gray16', '01'), ('rgb', 'palette'), ('gray8', 'rgb')]

def arrange(layout, dest, root, picks):
    "Rebuild the picked real samples in `layout`, varying encodings and using upper-case text keys"
    folders = {'lvit-qata': dict(train='Train_Folder', valid='Val_Folder', test='Test_Folder'),
               'lvit-mosmed': dict(train='Train_Folder', valid='Val_Folder', test='Test_Folder'),
               'guidedecoder': dict(train='Train', valid='Train', test='Test')}[layout]
    sub = ('Images', 'GTs') if layout == 'guidedecoder' else ('img', 'labelcol')
    rows, k = {}, 0
    for split, items in picks.items():
        for folder, e in items:
            img, mask = real_files(root, folder, e)
            d = dest/folders[split]
            (d/sub[0]).mkdir(parents=True, exist_ok=True); (d/sub[1]).mkdir(parents=True, exist_ok=True)
            ik, mk = KINDS[k % len(KINDS)]; k += 1
            mask_name = img.name if layout == 'lvit-mosmed' else f'mask_{img.name}'
            save_image(img, d/sub[0]/img.name, ik); save_mask(mask, d/sub[1]/mask_name, mk)
            rows.setdefault(split, []).append((mask_name.upper(), e['caption']))
    if layout == 'lvit-qata':
        write_table(rows['train'] + rows['valid'], dest/'Train_Folder/Train_Val_text.xlsx')
        write_table(rows['test'], dest/'Test_Folder/Test_text.csv')
    elif layout == 'lvit-mosmed':
        write_table(rows['train'], dest/'Train_Folder/Train_text.csv')
        write_table(rows['valid'], dest/'Val_Folder/Val_text.xlsx'); write_table(rows['test'], dest/'Test_Folder/Test_text.xlsx')
    else:
        (dest/'prompt').mkdir()
        write_table(rows['train'] + rows['valid'], dest/'prompt/train.csv'); write_table(rows['test'], dest/'prompt/test.csv')
    return dest

@pytest.mark.parametrize('layout', ['lvit-qata', 'lvit-mosmed', 'guidedecoder', 'sgseg'])
def test_layout_loads(layout, tmp_path, entries, small_sgseg):
    root, picks = entries
    dest = small_sgseg if layout == 'sgseg' else arrange(layout, tmp_path/layout, root, picks)
    r = check_dataset(dest)
    assert r['layout'] == layout and r['problems'] == []
    n = {k: v['n'] for k, v in r['splits'].items()}
    # guidedecoder: validation = the last 20% of train.csv's 8 rows -> int(0.8 * 8) = 6 train, 2 valid
    assert n == {'train': 6, 'valid': 2, 'test': 2}
    idx = read_dataset(dest)
    truth = {e['image_path'].removeprefix('mask_')[:-4]: (folder, e) for items in picks.values() for folder, e in items}
    for split, samples in idx.splits.items():
        for s in samples:
            img, mask = real_files(root, *truth[s.name])
            assert s.caption == truth[s.name][1]['caption']
            torch.testing.assert_close(load_image(s.image), load_image(img), atol=1e-6, rtol=0)   # 8/16-bit/RGB alike
            assert torch.equal(load_mask(s.mask), load_mask(mask))                             # 0/1, 0/255, palette, RGB alike
    if layout == 'guidedecoder':
        assert [s.name for s in idx.splits['valid']] == [e['image_path'][5:-4] for _, e in picks['valid']]


def test_wrong_column_xlsx(tmp_path, entries):
    root, picks = entries
    dest = arrange('lvit-qata', tmp_path/'q', root, picks)
    df = pd.read_excel(dest/'Train_Folder/Train_Val_text.xlsx').rename(columns={'Description': 'Text'})
    df.to_excel(dest/'Train_Folder/Train_Val_text.xlsx', index=False)
    r = check_dataset(dest)
    assert any('Train_Folder/Train_Val_text.xlsx' in p and 'Description' in p for p in r['problems'])
    assert sum(p.startswith('missing caption') for p in r['problems']) == 8
    assert r['splits']['train']['n'] == 0 and r['splits']['test']['n'] == 2


def test_unknown_layout(tmp_path):
    (tmp_path/'something').mkdir()
    with pytest.raises(DatasetError) as e: read_dataset(tmp_path)
    assert isinstance(e.value, ValueError)
    for name in ('lvit-qata', 'lvit-mosmed', 'sgseg', 'guidedecoder'): assert name in str(e.value)


# ---------------------------------------------------------------- the dataset and augmentation
def test_dataset_tensors(small_sgseg):
    samples = read_dataset(small_sgseg).splits['train']
    for augment in (None, 'consistent', 'released'):
        ds = LangSegDataset(samples, size=96, augment=augment)
        torch.manual_seed(1)
        for i in range(len(ds)):
            image, caption, mask = ds[i]
            assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
            assert mask.shape == (1, 96, 96) and mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0., 1.}
            assert isinstance(caption, str) and caption.endswith('.')
        if augment is None: assert caption == samples[-1].caption
    short = [type(samples[0])(samples[0].name, samples[0].image, samples[0].mask, 'lower left lung.')]
    assert LangSegDataset(short, 32, lvit_pad=True)[0][1].split().count('EOF') == 6


def test_flip_swaps_caption_and_mask(qata_root):
    s = next(s for s in read_dataset(qata_root).splits['valid']
             if caption_zones(s.caption)[3:] == [0, 0, 0] and 'left' in s.caption)
    image, caption, mask = LangSegDataset([s], 224)[0]
    fi, fm, fc = hflip(image, mask, caption)
    assert fc == caption.replace('left', 'right')
    assert torch.equal(fm, mask.flip(-1)) and torch.equal(fi, image.flip(-1))
    centre = lambda m: m[0].nonzero()[:, 1].float().mean().item() / 224
    assert centre(mask) < 0.5 < centre(fm)
    torch.manual_seed(0)
    ds, seen = LangSegDataset([s], 224, augment='consistent'), set()
    for _ in range(8):       # every consistent draw: the side named is the side the mask is on
        _, c, m = ds[0]
        seen.add(c)
        assert (centre(m) < 0.5) == ('left' in c)
    assert len(seen) == 2    # both flipped and unflipped draws happened


# ---------------------------------------------------------------- synthetic data
def test_synthetic_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path/'a', n_train=6, n_valid=2, n_test=2, size=64, seed=3)
    b = make_synthetic_dataset(tmp_path/'b', n_train=6, n_valid=2, n_test=2, size=64, seed=3)
    c = make_synthetic_dataset(tmp_path/'c', n_train=6, n_valid=2, n_test=2, size=64, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
    assert len(files) == 21
    assert all((a/f).read_bytes() == (b/f).read_bytes() for f in files)
    assert any((a/f).read_bytes() != (c/f).read_bytes() for f in files)
    r = check_dataset(a)
    assert r['layout'] == 'sgseg' and r['problems'] == [] and r['splits']['train']['image_sizes'] == {'64x64': 6}
    assert all(s.caption for s in read_dataset(a).splits['test'])


def test_synthetic_distractors(tmp_path):
    "Shifting the distractor range by one adds one look-alike opacity per image: same captions and masks"
    from reclmis_nb.synthetic import synthetic_sample
    a = make_synthetic_dataset(tmp_path/'a', n_train=8, n_valid=0, n_test=0, size=64, seed=1)
    b = make_synthetic_dataset(tmp_path/'b', n_train=8, n_valid=0, n_test=0, size=64, seed=1, distractors=(2, 3))
    assert (a/'prompts/annotation.json').read_text() == (b/'prompts/annotation.json').read_text()
    masks, images = sorted((a/'images/train/masks').glob('*.png')), sorted((a/'images/train/images').glob('*.png'))
    assert all(load_mask(p).equal(load_mask(b/p.relative_to(a))) for p in masks)
    gain = [(load_image(b/p.relative_to(a)) - load_image(p)).mean().item() for p in images]
    assert all(g != 0 for g in gain) and np.mean(gain) > 0.002  # every image changed; opacities add light
    with pytest.raises(ValueError, match='distractors'): synthetic_sample(np.random.default_rng(0), 64, distractors=(0, 4))


# ---------------------------------------------------------------- download
def repo_zip(path, src):
    "A zip shaped like the SGSeg repository archive, with the dataset `src` under data/QaTa"
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('SGSeg-15f47b2/README.md', 'code, not data')
        z.writestr('SGSeg-15f47b2/data/other/x.txt', 'not QaTa')
        for f in src.rglob('*'):
            if f.is_file(): z.write(f, f'SGSeg-15f47b2/data/QaTa/{f.relative_to(src).as_posix()}')
    return path

def test_download_from_local_archive(tmp_path, small_sgseg):
    archive = repo_zip(tmp_path/'sgseg.zip', small_sgseg)
    counts = {'train': 6, 'valid': 2, 'test': 2}
    got = download_qata(tmp_path/'QaTa', url=archive.as_uri(), expected=counts)
    assert sorted(p.name for p in got.iterdir()) == ['images', 'prompts']
    assert check_dataset(got)['problems'] == []
    assert download_qata(tmp_path/'via_path', url=str(archive), expected=counts).exists()
    before = snapshot(got)
    with pytest.raises(FileExistsError): download_qata(got, url=archive)
    assert snapshot(got) == before
    with pytest.raises(DatasetError, match='failed verification'): download_qata(tmp_path/'full', url=archive)  # 5716/1429/2113
    assert not (tmp_path/'full').exists()
    with pytest.raises(DatasetError, match='no folder'): download_qata(tmp_path/'x', url=archive, member='data/Missing')

def test_download_offline_message(tmp_path):
    with pytest.raises(DownloadError) as e: download_qata(tmp_path/'new'/'QaTa', url='http://127.0.0.1:9/sgseg.zip', timeout=5)
    assert 'by hand' in str(e.value) and str(tmp_path/'new'/'QaTa') in str(e.value)
    assert not (tmp_path/'new').exists()


# ---------------------------------------------------------------- CLI
def test_cli_data_check(small_sgseg, tmp_path):
    ok = subprocess.run(['reclmis', 'data', 'check', str(small_sgseg), '--json'], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert set(report) == {'layout', 'splits', 'problems'} and report['layout'] == 'sgseg' and report['problems'] == []
    assert {k: v['n'] for k, v in report['splits'].items()} == {'train': 6, 'valid': 2, 'test': 2}
    next((small_sgseg/'images/valid/masks').iterdir()).unlink()
    bad = subprocess.run(['reclmis', 'data', 'check', str(small_sgseg)], capture_output=True, text=True)
    assert bad.returncode == 1 and 'layout: sgseg' in bad.stdout and 'missing mask: images/valid/masks/' in bad.stdout
    none = subprocess.run(['reclmis', 'data', 'check', str(tmp_path/'nothing')], capture_output=True, text=True)
    assert none.returncode != 0 and 'sgseg' in none.stderr


def bits(t): return t.contiguous().view(torch.int32)


@pytest.mark.parametrize('size,release', [(128, False), (224, False), (128, True), (224, True)])
def test_cache_is_exact_on_real_data(qata_root, size, release):
    "Real QaTa items from the cache are the decoded-and-resized items bit for bit: our bilinear (float) and the release's cv2 (uint8)"
    from reclmis_nb.release import release_resize_pair
    from reclmis_nb.dataset import resize_pair
    samples = read_dataset(qata_root).splits['train'][::300]   # 6 images, covid_ and sub-s files
    kw = dict(size=size, resize=release_resize_pair if release else resize_pair)
    cached, plain = LangSegDataset(samples, **kw), LangSegDataset(samples, cache_bytes=0, **kw)
    first = [cached[i] for i in range(len(samples))]
    assert len(cached.cache) == len(samples) and not plain.cache
    for i in range(len(samples)):
        for a, b, c in zip(cached[i][::2], plain[i][::2], first[i][::2]):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            assert torch.equal(bits(a), bits(b)) and torch.equal(bits(a), bits(c))
    stored = {p[0].dtype for item in cached.cache.values() for p in item}
    # the 224 px grey files: at their own size, or resized on bytes as the release does, values are k/255
    assert stored == ({torch.uint8} if release or size == 224 else {torch.float32, torch.uint8})
    assert cached.cached_bytes == cached.cache_estimate()   # every file is a 224x224 grey PNG: sample 0 speaks for all


def test_cache_respects_its_budget(synth):
    "Items are cached until the budget is spent, then decoded every time, with the same values"
    samples = read_dataset(synth).splits['train']
    per_item = LangSegDataset(samples[:1], size=48).cache_estimate()
    ds = LangSegDataset(samples, size=48, cache_bytes=3 * per_item)
    items = [ds[i] for i in range(len(samples))]
    assert sorted(ds.cache) == [0, 1, 2] and ds.cached_bytes == 3 * per_item
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(items, (ds[i] for i in range(len(samples)))))
