"Interpretation tools on a trained `tiny` checkpoint: `explain` end to end, bad inputs, frozen encoder, explorer."
import json
import numpy as np
import pytest
import torch
from PIL import Image

from reclmis_nb.data import read_dataset
from reclmis_nb.dataset import LangSegDataset
from reclmis_nb.augment import swap_left_right
from reclmis_nb.training import train
from reclmis_nb.evaluation import load_checkpoint
from reclmis_nb.interpret import (explain, word_attributions, image_attributions, alignment, counterfactuals,
                                  AlignmentExplorer, tokenize_words, ZONE_BANDS)

pytestmark = pytest.mark.usefixtures('one_thread')

SYNTH = dict(seed=3)  # the `synth` fixture of conftest

@pytest.fixture(scope='module')
def run(synth, tmp_path_factory):
    "A finished 1-epoch tiny run, as `reclmis train --preset tiny` writes it"
    return train(synth, 'tiny', epochs=1, out=tmp_path_factory.mktemp('runs')/'tiny', device='cpu', progress=False)

@pytest.fixture(scope='module')
def image_file(synth):
    return sorted((synth/'images'/'test'/'images').iterdir())[0]

def test_explain_writes_four_files(run, image_file, tmp_path):
    sentence = 'Unilateral pulmonary infection, one infected area, upper left lung.'
    paths = explain(run/'best.pth', image_file, sentence, out=tmp_path/'out', n_steps=4)
    assert sorted(p.name for p in paths.values()) == sorted(f'{image_file.stem}_{k}' for k in
                                                            ('attention.png', 'words.png', 'words.json', 'counterfactual.png'))
    for k in ('attention', 'words_png', 'counterfactual'):
        with Image.open(paths[k]) as im: assert im.size[0] > 100 and im.size[1] > 100
    res = json.loads(paths['words_json'].read_text())
    # the tiny preset reads canonically (`canonical_text`): the words are those of the sentence it read
    assert res['read_as'] == 'unilateral pulmonary infection, one infected area, upper left lung.'
    assert res['words'] == ['unilateral', 'pulmonary', 'infection', ',', 'one', 'infected', 'area', ',', 'upper', 'left', 'lung', '.']
    assert len(res['scores']) == len(res['W_woi']) == len(res['words'])
    assert abs(sum(res['scores']) - (res['target'] - res['baseline_target']) - res['convergence_delta']) < 1e-3
    assert res['counterfactuals']['left <-> right']['sentence'] == swap_left_right(sentence)
    assert res['preset'] == 'tiny' and res['n_steps'] == 4
    with pytest.raises(FileExistsError, match='never writes over'):
        explain(run/'best.pth', image_file, sentence, out=tmp_path/'out')

@pytest.mark.parametrize('case', ['empty', 'missing image', 'bad image', 'missing checkpoint'])
def test_explain_bad_inputs(case, run, image_file, tmp_path):
    bad = tmp_path/'bad.png'
    bad.write_bytes(b'not a png')
    ckpt, image, text, msg = run/'best.pth', image_file, 'upper left lung', None
    if case == 'empty': text, msg = '  ', 'sentence is empty'
    if case == 'missing image': image, msg = tmp_path/'nope.png', 'image .*nope.png not found'
    if case == 'bad image': image, msg = bad, 'cannot read image .*bad.png'
    if case == 'missing checkpoint': ckpt, msg = tmp_path/'nope.pth', 'checkpoint .*nope.pth not found'
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        explain(ckpt, image, text, out=tmp_path/'out')
    assert not (tmp_path/'out').exists() or not any((tmp_path/'out').iterdir())

def test_attributions_leave_the_encoder_frozen(run, image_file):
    model, _ = load_checkpoint(run)
    model.train()
    te = model.text_encoder
    img = torch.rand(3, 40, 40)
    wa = word_attributions(model, img, 'lower right lung', n_steps=4)
    ia = image_attributions(model, img, 'lower right lung', region=(0.5, 0.5, 1, 1), n_steps=4)
    assert model.training and not te.training
    assert all(not p.requires_grad and p.grad is None for p in te.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert ia['region'] == 'box (0.5, 0.5, 1, 1)' and ia['region_mask'].mean() == 0.25
    assert wa['words'] == 'unilateral pulmonary infection , one infected area , lower right lung .'.split()  # as read
    assert np.isfinite(wa['scores']).all() and len(wa['scores']) == len(wa['words'])

def test_words_are_those_the_model_read(run, image_file, tmp_path):
    "Canonical reading relabels the words (ids and words from one sentence); as written keeps the typed words"
    typed = 'Unilateral pulmonary infection, one infected area, all LEFT lng'
    model, _ = load_checkpoint(run)
    tok = tokenize_words(model.text_encoder, typed)
    assert tok.sentence == 'unilateral pulmonary infection, three infected areas, upper middle lower left lung.'
    assert torch.equal(tok.ids, model.text_encoder.tokenize([tok.sentence])[0])
    assert tok.words[-6:] == ['upper', 'middle', 'lower', 'left', 'lung', '.']
    paths = explain(run/'best.pth', image_file, typed, out=tmp_path/'out', n_steps=2, canonical=False)
    res = json.loads(paths['words_json'].read_text())
    assert res['read_as'] == typed and res['words'][-3:] == ['all', 'LEFT', 'lng']

def test_region_changes_the_target(run):
    model, _ = load_checkpoint(run)
    img = torch.rand(3, 32, 32)
    a = word_attributions(model, img, 'upper left lung', region=(0, 0, .5, .5), n_steps=4)
    b = word_attributions(model, img, 'upper left lung', region=(.5, .5, 1, 1), n_steps=4)
    assert a['target'] != b['target'] and a['region'] != b['region']
    with pytest.raises(ValueError, match='top < bottom'): word_attributions(model, img, 'upper', region=(1, 0, 0, 1))

def test_subword_pieces_merge_into_words():
    from reclmis_nb.text import TextEncoder
    te = TextEncoder('minilm', max_tokens=12, dim=32)
    tok = tokenize_words(te, 'Consolidation with opacification, upper-left lung and more words than fit')
    assert tok.words[:3] == ['Consolidation', 'with', 'opacification']
    assert any(len(p) > 1 for p in tok.pieces)
    assert max(max(p) for p in tok.pieces) <= 10  # truncated: only words whose pieces fit before the end token
    assert sorted(t for p in tok.pieces for t in p) == list(range(1, 1 + sum(len(p) for p in tok.pieces)))

def test_explorer_on_a_checkpoint_and_a_learner(run, synth):
    from fastai.basics import Learner, DataLoaders
    from fastai.data.load import DataLoader
    from reclmis_nb.metrics import seg_loss
    model, _ = load_checkpoint(run)
    ex = AlignmentExplorer(model, synth, split='test', n_steps=4)
    assert len(ex.words.options) == len(ex.al['words'])
    assert ex.words.options[ex.words.index][0].lower() in ZONE_BANDS
    png, n = ex.figure.value, ex.n_draws
    ex.words.index = (ex.words.index + 1) % len(ex.words.options)
    assert ex.n_draws == n + 1 and ex.figure.value != png
    ex.map.value = 'image -> text'; ex.map.value = 'Captum'; ex.opacity.value = 0.2
    assert ex.n_draws == n + 4 and len(ex._captum) == 1
    ex.sample.value = 1
    assert ex.sentence.value == read_dataset(synth).splits['test'][1].caption
    learn = Learner(DataLoaders(DataLoader([0]), DataLoader([0])), model, loss_func=seg_loss)
    assert AlignmentExplorer(learn, LangSegDataset(read_dataset(synth).splits['valid'], size=32)).model is model

def test_counterfactuals_edit_the_sentence(run):
    model, _ = load_checkpoint(run)
    cf = counterfactuals(model, torch.rand(3, 32, 32), 'Bilateral pulmonary infection, one infected area, upper left lung.')
    sentences = [c['sentence'] for c in cf['results']]
    assert sentences[1:] == ['Bilateral pulmonary infection, one infected area, upper right lung.',
                             'Bilateral pulmonary infection, one infected area, lower left lung.',
                             'Bilateral pulmonary infection, two infected areas, upper left lung.']
    assert cf['results'][0]['changed'] == 0 and all(c['probs'].shape == (32, 32) for c in cf['results'])

def test_cli_explain(run, image_file, tmp_path, capsys):
    "`reclmis explain` end to end: four files, and an empty sentence as one line with exit code 2"
    from reclmis_nb.cli import main
    rc = main(['explain', '--checkpoint', str(run/'best.pth'), str(image_file), '--text', 'upper left lung',
               '--out', str(tmp_path/'cli')])
    assert rc == 0 and len(list((tmp_path/'cli').iterdir())) == 4
    rc = main(['explain', '--checkpoint', str(run/'best.pth'), str(image_file), '--text', ' ', '--out', str(tmp_path/'x')])
    assert rc == 2 and 'empty' in capsys.readouterr().err

def test_explain_refuses_a_baseline_checkpoint(synth, image_file, tmp_path):
    "A U-Net has no attention to show: one clear error, nothing written"
    unet = train(synth, 'tiny', epochs=1, out=tmp_path/'unet', device='cpu', progress=False, arch='unet')
    with pytest.raises(ValueError, match='holds a unet model'):
        explain(unet/'best.pth', image_file, 'Unilateral pulmonary infection, one infected area, upper left lung.', out=tmp_path/'out')
    assert not (tmp_path/'out').exists()
