"The `reclmis` command line end to end on generated data, with the seconds-long `tiny` preset."
import json, shutil, subprocess
import numpy as np
import pytest
import torch
from PIL import Image

from reclmis_nb.cli import main

from conftest import cli

pytestmark = pytest.mark.usefixtures('one_thread')

SYNTH = dict(seed=2)  # the `synth` fixture of conftest

@pytest.fixture(scope='module')
def trained(synth, tmp_path_factory):
    "A finished 2-epoch tiny run"
    run = tmp_path_factory.mktemp('runs')/'tiny'
    assert main(['train', '--data', str(synth), '--preset', 'tiny', '--epochs', '2', '--out', str(run), '--device', 'cpu', '--quiet']) == 0
    return run

def test_train_eval_predict(trained, synth, tmp_path, capsys):
    assert {'best.pth', 'last.pth', 'history.csv', 'run.json'} <= {p.name for p in trained.iterdir()}
    rc, out, _ = cli(capsys, 'eval', '--checkpoint', trained/'best.pth', '--data', synth, '--split', 'test', '--json', '--device', 'cpu')
    res = json.loads(out)
    assert rc == 0 and res['preset'] == 'tiny' and res['n'] == 4
    assert {'dice', 'iou', 'dice_global', 'iou_global'} <= set(res) and 0 <= res['dice'] <= 1
    rc, out, _ = cli(capsys, 'eval', '--checkpoint', trained/'best.pth', '--data', synth, '--json', '--native-grid',
                     '--text-ablation', 'shuffle', '--device', 'cpu')
    res = json.loads(out)
    assert rc == 0 and res['text_ablation'] == 'shuffle' and res['native_grid'] is True
    rc, out, _ = cli(capsys, 'eval', '--checkpoint', trained/'best.pth', '--data', synth, '--json', '--captions', 'lvit-noisy', '--device', 'cpu')
    res = json.loads(out)
    assert rc == 0 and res['captions'] == 'lvit-noisy' and res['same_caption'] == 0   # LViT's sentence case changes every sentence
    image = next((synth/'images'/'test'/'images').glob('*.png'))
    before = image.read_bytes()
    rc, out, err = cli(capsys, 'predict', '--checkpoint', trained/'best.pth', image, '--text',
                       'unilateral pulmonary infection, one infected area, lower left lung.', '--out', tmp_path/'pred', '--device', 'cpu')
    assert rc == 0, err
    mask, over = tmp_path/'pred'/f'{image.stem}_mask.png', tmp_path/'pred'/f'{image.stem}_overlay.png'
    assert Image.open(mask).size == Image.open(image).size and Image.open(over).mode == 'RGB'
    assert set(torch.tensor(list(Image.open(mask).getdata())).unique().tolist()) <= {0, 255}
    assert image.read_bytes() == before
    rc, _, err = cli(capsys, 'predict', '--checkpoint', trained/'best.pth', image, '--text', 'lower left lung', '--out', tmp_path/'pred')
    assert rc == 2 and 'exists' in err   # never writes over an existing file
    rc, out, err = cli(capsys, 'predict', '--checkpoint', trained/'best.pth', image, '--text', 'lower left lung',
                       '--out', tmp_path/'probs', '--probs', '--device', 'cpu')
    probs = np.load(tmp_path/'probs'/f'{image.stem}_probs.npy')
    assert rc == 0 and probs.dtype == np.float32 and probs.shape == (32, 32), err  # the tiny preset's input grid
    assert ((probs >= 0) & (probs <= 1)).all() and f'{image.stem}_probs.npy' in out


def test_eval_canonical(trained, synth, tmp_path, capsys):
    "Read canonically, LViT's wording with noise is the sentence SGSeg wrote: the same scores to the last bit"
    res = {}
    for args in (('--captions', 'sgseg'), ('--captions', 'lvit-noisy'), ('--captions', 'lvit-noisy', '--no-canonical')):
        rc, out, err = cli(capsys, 'eval', '--checkpoint', trained/'best.pth', '--data', synth, '--json', *args, '--device', 'cpu')
        assert rc == 0, err
        res[args[-1]] = json.loads(out)
    keys = ('dice', 'iou', 'dice_global', 'iou_global')
    assert res['sgseg']['canonical_text'] and res['lvit-noisy']['canonical_text']   # the tiny preset is `small`'s: on
    assert [res['lvit-noisy'][k] for k in keys] == [res['sgseg'][k] for k in keys]   # same features, same arithmetic
    assert res['--no-canonical']['canonical_text'] is False
    image = next((synth/'images'/'test'/'images').glob('*.png'))
    masks = []
    for k, text in enumerate(('unilateral pulmonary infection, one infected area, upper middle lower left lung.',
                              'Unilateral pulmonary infection, one infected area, all LEFT lng')):
        rc, _, err = cli(capsys, 'predict', '--checkpoint', trained/'best.pth', image, '--text', text, '--out', tmp_path/str(k),
                         '--canonical', '--device', 'cpu')
        assert rc == 0, err
        masks.append((tmp_path/str(k)/f'{image.stem}_mask.png').read_bytes())
    assert masks[0] == masks[1]   # the same sentence to the model, the same mask file

def test_resume_after_interruption(synth, tmp_path, capsys):
    run = tmp_path/'run'
    assert cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '3', '--out', run, '--stop-after', '1', '--quiet')[0] == 0
    first = torch.load(run/'last.pth', weights_only=True)
    assert first['epochs_done'] == 1
    assert cli(capsys, 'train', '--resume', run, '--quiet')[0] == 0
    done = torch.load(run/'last.pth', weights_only=True)
    assert done['epochs_done'] == 3 and [r['epoch'] for r in done['history']] == [0, 1, 2]
    assert done['history'][0] == first['history'][0]
    assert len((run/'history.csv').read_text().splitlines()) == 4
    rc, out, _ = cli(capsys, 'train', '--resume', run, '--quiet')
    assert rc == 0 and 'nothing to resume' in out

def test_runs_never_overwrite(synth, trained, tmp_path, capsys, monkeypatch):
    before = (trained/'last.pth').read_bytes()
    rc, _, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', '--out', trained, '--quiet')
    assert rc == 2 and err.startswith('reclmis: error:') and 'not empty' in err and err.count('\n') == 1
    assert (trained/'last.pth').read_bytes() == before
    monkeypatch.chdir(tmp_path)
    for _ in range(2): assert cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', '--quiet')[0] == 0
    assert len(list((tmp_path/'runs').iterdir())) == 2

@pytest.mark.parametrize('case', ['missing', 'unreadable', 'empty'])
def test_predict_errors(case, trained, tmp_path, capsys):
    image = tmp_path/'x.png'
    if case == 'unreadable': image.write_bytes(b'not a png at all')
    if case == 'empty': Image.new('L', (40, 40)).save(image)
    text = '   ' if case == 'empty' else 'lower left lung'
    rc, out, err = cli(capsys, 'predict', '--checkpoint', trained/'best.pth', image, '--text', text, '--out', tmp_path)
    assert rc == 2 and err.startswith('reclmis: error:') and err.count('\n') == 1, err
    assert {'missing': 'not found', 'unreadable': 'cannot read', 'empty': 'empty'}[case] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == 'missing' else ['x.png'])

def test_demo_plumbing(tmp_path):
    "The demo's steps and files, at test size (the real demo is measured in the demo notebook)"
    from reclmis_nb.demo import demo
    res = demo(tmp_path/'demo', preset='tiny', epochs=1, progress=False, n_train=8, n_valid=4, n_test=4, size=32)
    assert set(res['scores']) == {'true', 'shuffle', 'empty'}
    assert {'data', 'run', 'predictions.png', 'demo.json'} <= {p.name for p in (tmp_path/'demo').iterdir()}
    assert json.loads((tmp_path/'demo'/'demo.json').read_text())['scores']['true']['n'] == 4

def test_console_script_help():
    exe = shutil.which('reclmis')
    if exe is None: pytest.skip('the reclmis console script is not installed (pip install -e .)')
    out = subprocess.run([exe, '--help'], capture_output=True, text=True, check=True).stdout
    for command in ('train', 'eval', 'predict', 'profile', 'demo', 'data'): assert command in out

def test_profile_json(capsys):
    rc, out, _ = cli(capsys, 'profile', '--preset', 'small', '--json')
    prof = json.loads(out)
    assert rc == 0 and prof['preset'] == 'small' and prof['macs']['inference'] > 0

def test_train_baseline_and_ablation_flags(synth, tmp_path, capsys):
    "`--model`, `--loss-weight` and `--text-ablation` reach the recipe; misuse gives one clear line"
    rc, out, _ = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', '--out', tmp_path/'unet', '--model', 'unet', '--quiet')
    assert rc == 0 and torch.load(tmp_path/'unet'/'last.pth', weights_only=True)['recipe']['arch'] == 'unet'
    rc, out, _ = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', '--out', tmp_path/'abl',
                     '--loss-weight', 'v2t=0', '--loss-weight', 'ccl=0.5', '--seed', '7', '--quiet')
    ck = torch.load(tmp_path/'abl'/'last.pth', weights_only=True)
    assert rc == 0 and ck['config']['loss_weights'] == dict(seg=5., ccl=0.5, v2t=0., t2v=1.) and ck['recipe']['seed'] == 7
    assert 'train_v2t' not in ck['history'][0] and 'train_ccl' in ck['history'][0]
    rc, _, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--out', tmp_path/'bad', '--model', 'lvit', '--loss-weight', 'ccl=0')
    assert rc == 2 and 'lvit has only the segmentation loss' in err and not (tmp_path/'bad').exists()
    with pytest.raises(SystemExit): main(['train', '--data', str(synth), '--loss-weight', 'ccl'])
    assert 'TERM=WEIGHT' in capsys.readouterr().err

def test_profile_model_json(capsys):
    "The comparison row: the same counts for each model"
    rows = {}
    for m in ('unet', 'lvit', 'reclmis'):
        rc, out, _ = cli(capsys, 'profile', '--model', m, '--preset', 'small', '--json')
        rows[m] = json.loads(out)
        assert rc == 0 and rows[m]['model'] == m and rows[m]['image_size'] == 128
        assert rows[m]['macs']['flop_counter'] > 0 and rows[m]['params']['inference'] <= rows[m]['params']['total']
    assert rows['unet']['params']['text_encoder'] == 0 < rows['lvit']['params']['text_encoder']

def test_caption_variants_offered():
    "`eval --captions` offers exactly the wordings `captions.CAPTION_VARIANTS` renders"
    from reclmis_nb.cli import build_parser
    from reclmis_nb.captions import CAPTION_VARIANTS
    ev = build_parser()._subparsers._group_actions[0].choices['eval']
    assert next(a.choices for a in ev._actions if a.dest == 'captions') == list(CAPTION_VARIANTS)

def test_cache_flag(synth, tmp_path, capsys, monkeypatch):
    "`--cache-mb` reaches `train` as bytes (absent: the library's default); a negative size is refused in one line"
    from reclmis_nb import distributed
    seen = []
    monkeypatch.setattr(distributed, 'train_distributed', lambda *a, **kw: seen.append(kw) or tmp_path)
    for flag in (['--cache-mb', '0'], ['--cache-mb', '3'], []):
        assert cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--quiet', *flag)[0] == 0
    assert [kw.get('cache_bytes') for kw in seen] == [0, 3 * 2**20, None]
    rc, _, err = cli(capsys, 'train', '--data', synth, '--cache-mb', '-1')
    assert rc == 2 and "'-1': give a whole number of MiB >= 0" in err

@pytest.mark.parametrize('value', ['-1', 'some'])
def test_precise_bn_refuses_a_bad_count(value, synth, tmp_path, capsys):
    "One line from argparse, before any folder or batch"
    rc, out, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--precise-bn', value, '--out', tmp_path/'run')
    assert rc == 2 and f"{value!r}: give a whole number >= 0 (0: off)" in err and not (tmp_path/'run').exists()

@pytest.mark.parametrize('flag, want', [('--cpu-bf16', True), ('--no-cpu-bf16', False)])
def test_cpu_bf16_flag_reaches_the_recipe(flag, want, synth, tmp_path, capsys):
    "`reclmis train --cpu-bf16/--no-cpu-bf16` sets the recipe's `cpu_bf16`, saved with the run"
    rc, out, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', flag, '--out', tmp_path/'run', '--quiet')
    assert rc == 0, err
    assert json.loads((tmp_path/'run'/'run.json').read_text())['recipe']['cpu_bf16'] is want

@pytest.mark.parametrize('flag, want', [('--channels-last', True), ('--no-channels-last', False)])
def test_channels_last_flag_reaches_the_recipe(flag, want, synth, tmp_path, capsys):
    "`reclmis train --channels-last` sets the recipe's `channels_last`, saved with the run and shown in its first lines"
    rc, out, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', flag, '--out', tmp_path/'run')
    assert rc == 0, err
    assert json.loads((tmp_path/'run'/'run.json').read_text())['recipe']['channels_last'] is want
    assert ('channels_last=True' in out) is want

@pytest.mark.parametrize('flag, want', [(['--compile', 'eager'], 'eager'), ([], '')])
def test_compile_flag_reaches_the_recipe(flag, want, synth, tmp_path, capsys):
    "`reclmis train --compile eager` sets the recipe's `compile`, saved with the run and shown in its first lines"
    rc, out, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--epochs', '1', *flag, '--out', tmp_path/'run')
    assert rc == 0, err
    assert json.loads((tmp_path/'run'/'run.json').read_text())['recipe']['compile'] == want
    assert ('compile=eager' in out) is bool(want)

def test_compile_refuses_another_backend(synth, tmp_path, capsys):
    "A backend the recipe does not train with: one line from argparse naming the choices, before any folder; they are the recipe's"
    rc, out, err = cli(capsys, 'train', '--data', synth, '--preset', 'tiny', '--compile', 'aot_eager', '--out', tmp_path/'run')
    assert rc == 2 and "argument --compile: invalid choice: 'aot_eager' (choose from" in err and not (tmp_path/'run').exists()
    assert 'inductor' in err.splitlines()[-1] and 'Traceback' not in err  # argparse's usage, then the line (its quoting varies by Python)
    from reclmis_nb.recipes import COMPILE_BACKENDS, get_recipe
    assert COMPILE_BACKENDS == ('inductor', 'eager')
    with pytest.raises(ValueError, match="compile='aot_eager': train compiled with 'inductor' or 'eager'"): get_recipe('tiny', compile='aot_eager')
