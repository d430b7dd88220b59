"Training-loop guarantees: every configured loss term runs or fails loudly, non-finite losses stop the run, terms are logged."
import csv, math
import pytest
import torch

from reclmis_nb import learner
from reclmis_nb.data import make_synthetic_dataset
from reclmis_nb.learner import train, LossTermMissing, NonFiniteLoss, TINY_MODEL
from reclmis_nb.model import RecLMIS

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    "8 train / 4 valid / 4 test generated samples (2 train batches of 4 per epoch)"
    return make_synthetic_dataset(tmp_path_factory.mktemp('data')/'synth', n_train=8, n_valid=4, n_test=4, size=32, seed=1)

def tampered(term, after=0, nan=False):
    "A RecLMIS whose `loss_<term>` is dropped (or made NaN) in every train forward after the first `after`"
    class Tampered(RecLMIS):
        calls = 0
        def forward(self, *x):
            out = super().forward(*x)
            if self.training:
                Tampered.calls += 1
                if Tampered.calls > after:
                    if nan: out[f'loss_{term}'] = out[f'loss_{term}'] * float('nan')
                    else: del out[f'loss_{term}']
            return out
    return Tampered

def history(run):
    with open(run/'history.csv') as f: return list(csv.DictReader(f))

def test_aux_terms_logged(synth, tmp_path):
    run = train(synth, 'tiny', epochs=2, out=tmp_path/'run', device='cpu', progress=False)
    rows = history(run)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for r in rows:
        for k in ('train_seg', 'train_ccl', 'train_v2t', 'train_t2v', 'dice', 'iou', 'dice_global', 'iou_global', 'lr'):
            assert math.isfinite(float(r[k])), (k, r[k])
        assert float(r['train_ccl']) > 0 and float(r['train_v2t']) > 0 and float(r['train_t2v']) > 0
    ck = torch.load(run/'last.pth', weights_only=True)
    assert ck['history'][-1]['train_t2v'] == pytest.approx(float(rows[-1]['train_t2v']))

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(learner, 'RecLMIS', tampered('t2v', after=2, nan=True))  # epoch 0 fine, epoch 1 batch 0 NaN
    with pytest.raises(NonFiniteLoss, match=r'L_t2v=nan\) at epoch 1, train batch 0'):
        train(synth, 'tiny', epochs=3, out=tmp_path/'run', device='cpu', progress=False)
    ck = torch.load(tmp_path/'run'/'last.pth', weights_only=True)
    assert ck['epochs_done'] == 1 and len(ck['history']) == 1
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())

def test_configured_term_missing_raises(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(learner, 'RecLMIS', tampered('v2t'))
    with pytest.raises(LossTermMissing, match="no 'loss_v2t'"):
        train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False)

def test_zero_weight_switches_a_term_off(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(learner, 'RecLMIS', tampered('v2t'))
    weights = dict(seg=5., ccl=0.2, v2t=0., t2v=1.)
    run = train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False,
                model_overrides=dict(TINY_MODEL, loss_weights=weights))
    row = history(run)[0]
    assert 'train_v2t' not in row and 'train_ccl' in row
