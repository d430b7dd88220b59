"Training-loop guarantees: every configured loss term runs or fails loudly, non-finite losses stop the run, terms are logged."
import csv, math
import pytest
import torch

from fastai.basics import Callback

from reclmis_nb import training, evaluation, baselines, learner
from reclmis_nb.training import train
from reclmis_nb.learner import LossTermMissing, NonFiniteLoss, RecLMISObjective, compile_model
from reclmis_nb.recipes import TINY_MODEL
from reclmis_nb.model import RecLMIS

pytestmark = pytest.mark.usefixtures('one_thread')

SYNTH = dict(size=32, seed=1)  # the `synth` fixture of conftest: 2 train batches of 4 per epoch

# `train` builds its model through the one factory, `baselines.model_from_config`: the tampered class replaces RecLMIS there
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
    monkeypatch.setattr(baselines, 'RecLMIS', tampered('t2v', after=2, nan=True))  # epoch 0 fine, epoch 1 batch 0 NaN
    with pytest.raises(NonFiniteLoss, match=r'L_t2v=nan\) at epoch 1, train batch 0'):
        train(synth, 'tiny', epochs=3, out=tmp_path/'run', device='cpu', progress=False)
    ck = torch.load(tmp_path/'run'/'last.pth', weights_only=True)
    assert ck['epochs_done'] == 1 and len(ck['history']) == 1
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())

def test_configured_term_missing_raises(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, 'RecLMIS', tampered('v2t'))
    with pytest.raises(LossTermMissing, match="no 'loss_v2t'"):
        train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False)

def test_zero_weight_switches_a_term_off(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, 'RecLMIS', tampered('v2t'))
    weights = dict(seg=5., ccl=0.2, v2t=0., t2v=1.)
    run = train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False,
                model_overrides=dict(TINY_MODEL, loss_weights=weights))
    row = history(run)[0]
    assert 'train_v2t' not in row and 'train_ccl' in row

@pytest.mark.parametrize('arch', ['unet', 'lvit'])
def test_baselines_train_resume_evaluate(arch, synth, tmp_path):
    "The same recipes train the baselines: checkpoints record the model, resume continues it, evaluate rebuilds it"
    run = train(synth, 'tiny', epochs=2, out=tmp_path/'run', device='cpu', progress=False, arch=arch, stop_after=1)
    assert torch.load(run/'last.pth', weights_only=True)['epochs_done'] == 1
    train(resume=run, device='cpu', progress=False)
    ck = torch.load(run/'last.pth', weights_only=True)
    assert ck['epochs_done'] == 2 and ck['recipe']['arch'] == arch and ck['config']['arch'] == arch
    assert 'train_ccl' not in history(run)[0] and math.isfinite(float(history(run)[-1]['train_seg']))
    model, info = evaluation.load_checkpoint(run)
    assert type(model).__name__ == {'unet': 'UNet', 'lvit': 'LViT'}[arch]
    assert (model.text_encoder is None) == (arch == 'unet')
    res = evaluation.evaluate(run, synth, 'valid')
    assert res['model'] == arch and res['n'] == 4 and 0 <= res['dice'] <= 1

def test_train_without_text(synth, tmp_path, monkeypatch):
    "`text_ablation='empty'` trains on the empty sentence only, and evaluation keeps the run's ablation"
    tables = []
    monkeypatch.setattr(training.OneProcess, 'shared', lambda self, path, build: tables.append(build()) or tables[-1])
    run = train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False, text_ablation='empty')
    assert [list(t) for t in tables] == [['']]   # the only sentence encoded for training and validation
    assert evaluation.evaluate(run, synth, 'valid')['text_ablation'] == 'empty'
    assert evaluation.evaluate(run, synth, 'valid', text_ablation='shuffle')['text_ablation'] == 'shuffle'

@pytest.mark.parametrize('field,value,match', [('arch', 'vit', "unknown model 'vit'"),
                                               ('text_ablation', 'none', "unknown text ablation 'none'")])
def test_bad_recipe_fields(field, value, match, synth, tmp_path):
    with pytest.raises(ValueError, match=match): train(synth, 'tiny', out=tmp_path/'run', progress=False, **{field: value})
    assert not (tmp_path/'run').exists()

def test_cache_changes_no_number(synth, tmp_path):
    "Training with the item cache gives the weights and history of training without it, bit for bit"
    runs = {c: train(synth, 'tiny', epochs=2, out=tmp_path/f'cache{c}', device='cpu', progress=False, cache_bytes=c)
            for c in (0, training.CACHE_BYTES)}
    a, b = (torch.load(r/'last.pth', weights_only=True) for r in runs.values())
    assert a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    drop = lambda h: [{k: v for k, v in row.items() if k != 'seconds'} for row in h]
    assert drop(a['history']) == drop(b['history'])

def test_precise_bn_resumes_and_trains_the_same_weights(synth, tmp_path):
    "`precise_bn` changes the saved statistics and validation, not training; a resumed run ends as an uninterrupted one"
    kw = dict(device='cpu', progress=False, epochs=3)
    plain = torch.load(train(synth, 'tiny', out=tmp_path/'plain', **kw)/'last.pth', weights_only=True)
    whole = torch.load(train(synth, 'tiny', out=tmp_path/'whole', precise_bn=2, **kw)/'last.pth', weights_only=True)
    train(synth, 'tiny', out=tmp_path/'cut', precise_bn=2, stop_after=2, **kw)
    cut = torch.load(train(resume=tmp_path/'cut', device='cpu', progress=False)/'last.pth', weights_only=True)
    stats = lambda k: k.endswith(('running_mean', 'running_var'))
    assert all(torch.equal(plain['model'][k], whole['model'][k]) for k in plain['model'] if not stats(k) and 'num_batches' not in k)
    assert any(not torch.equal(plain['model'][k], whole['model'][k]) for k in plain['model'] if stats(k))
    assert all(torch.equal(whole['model'][k], cut['model'][k]) for k in whole['model'])
    drop = lambda h: [{k: v for k, v in row.items() if k != 'seconds'} for row in h]
    assert drop(whole['history']) == drop(cut['history']) and whole['recipe']['precise_bn'] == 2

def test_channels_last_trains_channels_last_and_resumes(synth, tmp_path):
    "The recipe's `channels_last`: NHWC weights in the checkpoint, which resumes to the uninterrupted run's weights"
    kw = dict(device='cpu', progress=False, epochs=3, channels_last=True)
    whole = torch.load(train(synth, 'tiny', out=tmp_path/'whole', **kw)/'last.pth', weights_only=True)
    train(synth, 'tiny', out=tmp_path/'cut', stop_after=2, **kw)
    cut = torch.load(train(resume=tmp_path/'cut', device='cpu', progress=False)/'last.pth', weights_only=True)
    conv = whole['model']['encoder.inc.0.weight']
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert whole['recipe']['channels_last'] is True and cut['recipe']['channels_last'] is True
    assert all(torch.equal(whole['model'][k], cut['model'][k]) for k in whole['model'])
    model, _ = evaluation.load_checkpoint(tmp_path/'whole'/'last.pth')  # scored as any other checkpoint
    assert all(torch.equal(v, whole['model'][k]) for k, v in model.state_dict().items())

def test_compiled_training_is_the_eager_run(synth, tmp_path, monkeypatch):
    """The recipe's `compile` with TorchDynamo's 'eager' backend (its graphs run by eager PyTorch: the same operations
    in the same order): the eager run's history and weights exactly, the eager state-dict keys, and a resumable run"""
    seen = []
    def spy(model, backend='inductor'):
        seen.append(backend); return compile_model(model, backend)
    monkeypatch.setattr(learner, 'compile_model', spy)  # what `CompileModel` calls
    kw = dict(device='cpu', progress=False, epochs=2)
    plain = torch.load(train(synth, 'tiny', out=tmp_path/'plain', **kw)/'last.pth', weights_only=True)
    comp = torch.load(train(synth, 'tiny', out=tmp_path/'comp', compile='eager', **kw)/'last.pth', weights_only=True)
    assert seen == ['eager'] and comp['recipe']['compile'] == 'eager' and plain['recipe']['compile'] == ''
    assert list(comp['model']) == list(plain['model'])  # no `_orig_mod.` prefix
    assert all(torch.equal(plain['model'][k], comp['model'][k]) for k in plain['model'])
    drop = lambda h: [{k: v for k, v in row.items() if k != 'seconds'} for row in h]
    assert drop(plain['history']) == drop(comp['history'])
    train(synth, 'tiny', out=tmp_path/'cut', stop_after=1, compile='eager', **kw)
    cut = torch.load(train(resume=tmp_path/'cut', device='cpu', progress=False)/'last.pth', weights_only=True)
    assert seen == ['eager'] * 3 and all(torch.equal(comp['model'][k], cut['model'][k]) for k in comp['model'])

class Dtypes(Callback):
    "The dtype of the first convolution's output and of the loss in the last train batch, and of the weights' gradients"
    order = RecLMISObjective.order + 1
    def before_fit(self):
        conv = next(m for m in self.learn.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: setattr(self, 'conv', o.dtype) if m.training else None)
    def after_loss(self):
        if self.training: self.loss_dtype = self.learn.loss.dtype
    def after_backward(self): self.grads = {p.grad.dtype for p in self.learn.model.parameters() if p.grad is not None}

@pytest.mark.parametrize('native', [True, False])
def test_cpu_bf16_trains_in_bf16_only_where_the_cpu_has_it(native, synth, tmp_path, monkeypatch, capsys):
    "`cpu_bf16`: bf16 convolutions, float32 loss/gradients/checkpoint on a CPU with bf16 instructions; float32, said, on others"
    monkeypatch.setattr(learner, 'native_bf16', lambda: native)  # bf16 autocast runs on any CPU (emulated without the instructions)
    probe = Dtypes()
    run = train(synth, 'tiny', epochs=1, out=tmp_path/'run', device='cpu', progress=False, cpu_bf16=True, cbs=[probe])
    first = capsys.readouterr().out
    assert probe.conv == (torch.bfloat16 if native else torch.float32)
    assert (probe.loss_dtype, probe.grads) == (torch.float32, {torch.float32})
    assert ('precision: bf16 autocast' in first) == native and ('no bf16 instructions' in first) == (not native)
    ck = torch.load(run/'last.pth', weights_only=True)
    assert ck['recipe']['cpu_bf16'] is True and {v.dtype for v in ck['model'].values() if v.is_floating_point()} == {torch.float32}
