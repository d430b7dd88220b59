"""Bad input, as a careful user and an adversarial tester give it: each case exits with the CLI's code
(0 success, 1 the data has problems, 2 the user's input is wrong, 130 interrupted), says in one line which
file or value is wrong, and leaves inputs and earlier outputs as they were. Real QaTa files (a few copied from
../shared/data) where real files matter; the tiny preset keeps every run to seconds."""
import hashlib, json, shutil, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from reclmis_nb.cli import main
from reclmis_nb.images import Notice
from reclmis_nb.synthetic import make_synthetic_dataset

from conftest import cli

pytestmark = pytest.mark.usefixtures('one_thread')

TEXT = 'unilateral pulmonary infection, one infected area, lower left lung.'

def digest(folder):
    "Every file under `folder` with the hash of its bytes: equal digests mean nothing was changed, added or removed"
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob('*')) if p.is_file()}

def one_error_line(err):
    "stderr is one line `reclmis: error: ...` (notices and library warnings aside), no traceback"
    lines = [l for l in err.splitlines() if l.startswith('reclmis: error:')]
    return len(lines) == 1 and 'Traceback' not in err

@pytest.fixture
def broken(qata_root, tmp_path):
    "A copy of 8 train and 4 valid real QaTa samples in SGSeg's layout (images, masks, their annotation entries), to break"
    dest = tmp_path/'broken'
    ann = json.loads((qata_root/'prompts/annotation.json').read_text())
    small = {'train': ann['train'][:8], 'valid': ann['valid'][:4]}
    for split, entries in small.items():
        for sub in ('images', 'masks'): (dest/'images'/split/sub).mkdir(parents=True)
        for e in entries:
            mask = e['image_path']
            shutil.copy(qata_root/'images'/split/'masks'/mask, dest/'images'/split/'masks'/mask)
            shutil.copy(qata_root/'images'/split/'images'/mask.removeprefix('mask_'), dest/'images'/split/'images'/mask.removeprefix('mask_'))
    (dest/'prompts').mkdir()
    (dest/'prompts/annotation.json').write_text(json.dumps(small))
    return dest

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A finished 2-epoch tiny run on generated data, and its data"
    tmp = tmp_path_factory.mktemp('run')
    data = make_synthetic_dataset(tmp/'synth', 8, 4, 4, size=48, seed=0)
    assert main(['train', '--data', str(data), '--preset', 'tiny', '--epochs', '2', '--out', str(tmp/'run'), '--quiet']) == 0
    return tmp/'run', data

@pytest.mark.parametrize('split', ['valid', 'train'])
def test_train_checks_every_file_first(split, broken, tmp_path, capsys):
    "A zero-byte PNG refuses the run before any folder or batch, naming the file (it cost an epoch and a traceback)"
    bad = sorted((broken/'images'/split/'images').iterdir())[1]
    bad.write_bytes(b'')
    before = digest(broken)
    rc, _, err = cli(capsys, 'train', '--data', broken, '--preset', 'tiny', '--out', tmp_path/'run', '--quiet')
    assert rc == 1 and f'images/{split}/images/{bad.name}' in err and 'Traceback' not in err
    assert not (tmp_path/'run').exists() and digest(broken) == before
    rc, _, err = cli(capsys, 'train', '--data', broken, '--preset', 'tiny', '--out', tmp_path/'run2', '--quiet', '--no-check')
    assert rc == 2 and one_error_line(err) and bad.name in err   # unchecked, the loader names the file in one line

def test_malformed_annotation_json(broken, tmp_path, capsys):
    (broken/'prompts/annotation.json').write_text('{"train": [')
    rc, _, err = cli(capsys, 'train', '--data', broken, '--preset', 'tiny', '--out', tmp_path/'run', '--quiet')
    assert rc == 1 and 'prompts/annotation.json' in err and 'JSONDecodeError' in err and not (tmp_path/'run').exists()

def test_corrupt_image_in_eval_split(run, tmp_path, capsys):
    ckpt, data = run[0]/'best.pth', Path(shutil.copytree(run[1], tmp_path/'data'))
    bad = sorted((data/'images/test/images').iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:200])
    rc, _, err = cli(capsys, 'eval', '--checkpoint', ckpt, '--data', data, '--split', 'test')
    assert rc == 1 and bad.name in err and 'Traceback' not in err
    rc, _, err = cli(capsys, 'eval', '--checkpoint', ckpt, '--data', data, '--split', 'test', '--no-check')
    assert rc == 2 and one_error_line(err) and bad.name in err

def test_empty_split_says_why(run, tmp_path, capsys):
    "A test split whose images have no captions: the problems (checked) or 'no complete sample' (unchecked), never 'found test'"
    data = Path(shutil.copytree(run[1], tmp_path/'data'))
    ann = json.loads((data/'prompts/annotation.json').read_text()); ann['test'] = []
    (data/'prompts/annotation.json').write_text(json.dumps(ann))
    rc, _, err = cli(capsys, 'eval', '--checkpoint', run[0]/'best.pth', '--data', data, '--split', 'test')
    assert rc == 1 and 'missing caption' in err
    rc, _, err = cli(capsys, 'eval', '--checkpoint', run[0]/'best.pth', '--data', data, '--split', 'test', '--no-check')
    assert rc == 2 and one_error_line(err) and 'no complete sample' in err and 'data check' in err

@pytest.mark.parametrize('argv, value', [
    (['train', '--epochs', '0'], "'0'"), (['train', '--epochs', '-1'], "'-1'"), (['train', '--bs', '0'], "'0'"),
    (['train', '--lr', '1e6'], "'1e6'"), (['train', '--device', 'nonsense'], "'nonsense'"),
    (['explain', '--checkpoint', 'x.pth', 'x.png', '--text', 'lung', '--steps', '0'], "'0'"),
    (['demo', '--threads', '0'], "'0'")])
def test_flag_ranges_before_any_work(argv, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, *argv, *(['--data', tmp_path] if argv[0] == 'train' else []))
    assert rc == 2 and value in err and 'Traceback' not in err and list(tmp_path.iterdir()) == []

def test_cuda_on_a_machine_without_it(capsys):
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA')
    rc, _, err = cli(capsys, 'eval', '--checkpoint', 'x.pth', '--data', '.', '--device', 'cuda')
    assert rc == 2 and 'no CUDA GPU' in err

def test_resume_with_the_progress_bar(run, tmp_path, capsys):
    "The README's command as users type it (no --quiet): fastai's bar used to fail on the resumed start epoch"
    data = run[1]
    assert cli(capsys, 'train', '--data', data, '--preset', 'tiny', '--epochs', '2', '--stop-after', '1', '--out', tmp_path/'r', '--quiet')[0] == 0
    rc, out, err = cli(capsys, 'train', '--resume', tmp_path/'r')
    assert rc == 0, err
    assert torch.load(tmp_path/'r'/'last.pth', weights_only=True)['epochs_done'] == 2

@pytest.mark.parametrize('flags, named', [(['--data', 'OTHER'], 'data'), (['--lr', '0.5'], 'lr 0.5'), (['--bs', '2'], 'bs 2'),
                                          (['--preset', 'small'], 'preset small'), (['--model', 'unet'], 'model unet'),
                                          (['--loss-weight', 'ccl=0'], '--loss-weight')])
def test_resume_refuses_changes(flags, named, run, tmp_path, capsys):
    data, r = run[1], tmp_path/'r'
    assert cli(capsys, 'train', '--data', data, '--preset', 'tiny', '--epochs', '2', '--stop-after', '1', '--out', r, '--quiet')[0] == 0
    other = Path(shutil.copytree(data, tmp_path/'OTHER'))
    before = digest(r)
    rc, _, err = cli(capsys, 'train', '--resume', r, *[str(other) if f == 'OTHER' else f for f in flags], '--quiet')
    assert rc == 2 and one_error_line(err) and named in err and digest(r) == before
    assert cli(capsys, 'train', '--resume', r, '--data', data, '--preset', 'tiny', '--quiet')[0] == 0   # the run's own values pass

def test_resume_a_folder_without_checkpoint(run, tmp_path, capsys):
    "What a SIGKILL during the first save leaves: run.json and a 0-byte best.pth.tmp"
    r = tmp_path/'killed'; r.mkdir()
    (r/'run.json').write_text(json.dumps(dict(preset='tiny', data=str(run[1]))))
    (r/'best.pth.tmp').write_bytes(b'')
    before = digest(r)
    rc, _, err = cli(capsys, 'train', '--resume', r, '--quiet')
    assert rc == 2 and one_error_line(err) and 'no last.pth' in err and 'delete the folder' in err and digest(r) == before

def test_ctrl_c_says_how_to_resume(run, tmp_path, capsys, monkeypatch):
    "Ctrl-C in the second of three epochs: one line with the epoch, the checkpoint kept and the exact command"
    import reclmis_nb.recipes as recipes
    real = recipes.EpochLR.before_epoch
    def interrupt(self):
        if self.epoch == 1: raise KeyboardInterrupt
        real(self)
    monkeypatch.setattr(recipes.EpochLR, 'before_epoch', interrupt)
    r = tmp_path/'r'
    rc, _, err = cli(capsys, 'train', '--data', run[1], '--preset', 'tiny', '--epochs', '3', '--out', r, '--quiet')
    assert rc == 130 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert 'epoch 2 of 3' in err and 'keeps the 1 finished epoch' in err
    command = err.strip().split('continue with: ')[1].split()
    monkeypatch.setattr(recipes.EpochLR, 'before_epoch', real)
    assert command[:3] == ['reclmis', 'train', '--resume'] and cli(capsys, *command[1:], '--quiet')[0] == 0
    assert torch.load(r/'last.pth', weights_only=True)['epochs_done'] == 3

def test_data_check_unreadable_folder(broken, capsys, monkeypatch):
    "A folder the system refuses to list: exit 2 (the input), not 1 (problems of a dataset it could read)"
    masks, real = broken/'images/train/masks', Path.iterdir
    def iterdir(self):
        if self == masks: raise PermissionError(13, 'Permission denied', str(self))
        return real(self)
    monkeypatch.setattr(Path, 'iterdir', iterdir)
    rc, _, err = cli(capsys, 'data', 'check', broken)
    assert rc == 2 and one_error_line(err) and str(masks) in err and 'Permission denied' in err

@pytest.mark.parametrize('command', ['predict', 'explain', 'eval', 'resume'])
def test_truncated_checkpoint(command, run, tmp_path, capsys):
    r = Path(shutil.copytree(run[0], tmp_path/'run'))
    name = 'last.pth' if command == 'resume' else 'best.pth'
    (r/name).write_bytes((r/name).read_bytes()[:1000])
    image = sorted((run[1]/'images/test/images').iterdir())[0]
    argv = {'predict': ['predict', '--checkpoint', r/name, image, '--text', TEXT, '--out', tmp_path/'o'],
            'explain': ['explain', '--checkpoint', r/name, image, '--text', TEXT, '--out', tmp_path/'o'],
            'eval': ['eval', '--checkpoint', r/name, '--data', run[1]],
            'resume': ['train', '--resume', r, '--quiet']}[command]
    before = digest(r)
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and one_error_line(err) and str(r/name) in err and digest(r) == before and not (tmp_path/'o').exists()

def test_explain_all_or_nothing_and_one_glyph_notice(run, tmp_path, capsys, monkeypatch):
    "A failure half way leaves no file, so the corrected rerun gets its --out; CJK gives one notice, not one warning per glyph"
    import reclmis_nb.interpret as interpret
    image, out = sorted((run[1]/'images/test/images').iterdir())[0], tmp_path/'why'
    real = interpret.counterfactual_figure
    def fail(*a, **k): raise RuntimeError('disk full')
    monkeypatch.setattr(interpret, 'counterfactual_figure', fail)
    rc, _, err = cli(capsys, 'explain', '--checkpoint', run[0]/'best.pth', image, '--text', TEXT, '--out', out, '--steps', '2')
    assert rc == 1 and one_error_line(err) and 'disk full' in err and list(out.iterdir()) == []
    monkeypatch.setattr(interpret, 'counterfactual_figure', real)
    rc, _, err = cli(capsys, 'explain', '--checkpoint', run[0]/'best.pth', image, '--text', TEXT + ' 左肺下叶', '--out', out, '--steps', '2')
    assert rc == 0, err
    assert len(list(out.iterdir())) == 4 and err.count('reclmis: notice:') == 1 and 'Glyph' not in err
    assert all(ch in err for ch in '左肺下叶')

def test_predict_never_leaves_half_its_files(run, tmp_path, capsys, monkeypatch):
    import reclmis_nb.prediction as prediction
    image, out = sorted((run[1]/'images/test/images').iterdir())[0], tmp_path/'pred'
    monkeypatch.setattr(prediction, 'overlay', lambda *a, **k: 1 / 0)
    rc, _, err = cli(capsys, 'predict', '--checkpoint', run[0]/'best.pth', image, '--text', TEXT, '--out', out)
    assert rc == 1 and one_error_line(err) and list(out.iterdir()) == []

def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    argv = ['eval', '--checkpoint', str(tmp_path/'x.pth'), '--data', str(tmp_path)]
    assert main(argv) == 2
    with pytest.raises(Exception, match='x.pth not found'): main(['--debug', *argv])
    monkeypatch.setenv('RECLMIS_DEBUG', '1')
    with pytest.raises(Exception, match='x.pth not found'): main(argv)

@pytest.fixture(scope='module')
def model_and_image(run):
    from reclmis_nb.evaluation import load_checkpoint
    from reclmis_nb.images import load_image
    path = sorted((run[1]/'images/test/images').iterdir())[0]
    return load_checkpoint(run[0]/'best.pth')[0], load_image(path), path

def test_predict_image_takes_what_notebooks_pass(model_and_image):
    "uint8 tensors, 0-255 floats, PIL, numpy, (H,W) and (1,3,H,W): handled, or refused by name; never silently wrong"
    from reclmis_nb.prediction import predict_image
    model, image, path = model_and_image
    ref = predict_image(model, image, TEXT)
    u8 = (image * 255).round().byte()
    for x in (path, u8, u8[None], u8.permute(1, 2, 0).numpy(), Image.open(path)):
        # 8-bit rounding (at most 0.5/255 per pixel) moves the probabilities of this tiny model far less than 1e-2
        assert torch.allclose(predict_image(model, x, TEXT), ref, atol=1e-2)
    if torch.equal(image[0], image[1]): assert torch.allclose(predict_image(model, u8[0], TEXT), ref, atol=1e-2)   # (H, W) grey
    with pytest.raises(ValueError, match=r'\[0, 1\]'): predict_image(model, image * 255, TEXT)
    with pytest.raises(ValueError, match=r'\(2, 3, '): predict_image(model, image[None].repeat(2, 1, 1, 1), TEXT)
    with pytest.raises(TypeError, match='list'): predict_image(model, [1, 2], TEXT)

def test_one_string_for_several_images(model_and_image):
    model, image, _ = model_and_image
    x = torch.nn.functional.interpolate(image[None], size=(32, 32)).repeat(2, 1, 1, 1)
    with pytest.raises(ValueError, match='one sentence per image'): model.predict(x, 'ab')
    assert model.predict(x[:1], TEXT).shape == (1, 1, 32, 32)

def test_notices(tmp_path, capsys, run):
    "Merged mask labels and a cut sentence are said once, in one line each"
    from reclmis_nb.images import load_mask
    pal = Image.new('P', (2, 2)); pal.putdata([0, 1, 2, 2]); pal.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2] + [0] * 759)
    pal.save(tmp_path/'palette.png')   # palette indices 0, 1, 2 on a grey palette
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        assert load_mask(tmp_path/'palette.png').sum() == 3
    assert [type(w.message) for w in seen] == [Notice] and '(1, 1, 1), (2, 2, 2)' in str(seen[0].message)
    image = sorted((run[1]/'images/test/images').iterdir())[0]
    rc, _, err = cli(capsys, 'predict', '--checkpoint', run[0]/'best.pth', image, '--text', 'lung ' * 2000, '--out', tmp_path/'p')
    assert rc == 0 and err.count('reclmis: notice:') == 1 and 'limit of' in err
