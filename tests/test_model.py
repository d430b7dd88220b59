"The assembled RecLMIS model: parity with the released parameter and MAC counts at 224, bad inputs, presets."
import pytest, torch
from reclmis_nb.text import TextEncoder
from reclmis_nb.model import RecLMIS, RecLMISConfig, get_preset, record_calls, TRAINING_PARTS, n_params
from reclmis_nb.profile import profile_model, format_profile

# Measured on the released code (batch 1, 224x224, 18 tokens); "as released" includes its unused parameters.
RELEASED = {
    'qata': dict(trainable=69_440_255, rec=25_235_456, unused=8_762_304, train_macs=29_361_185_878),
    'mosmed': dict(trainable=56_822_527, rec=18_926_592, unused=6_659_008, train_macs=28_152_644_694),
}

@pytest.fixture(scope='module')
def clip_random():
    "CLIP's text tower with random weights: its size and cost do not depend on the weights"
    return TextEncoder('clip', max_tokens=18, dim=512, pretrained=False)

@pytest.fixture(scope='module')
def profiles(clip_random):
    return {p: profile_model(p, text_encoder=clip_random) for p in RELEASED}

@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return RecLMIS(get_preset('small', text_encoder='tiny', image_size=64), verbose=False)

@pytest.mark.parametrize('preset', list(RELEASED))
def test_parameter_parity(profiles, preset):
    d, r = profiles[preset], RELEASED[preset]
    p, rel = d['params'], d['params_released']
    assert {k: p[f'encoder.{k}'] for k in ('inc', 'down1', 'down2', 'down3', 'down4')} == \
        dict(inc=1_920, down1=221_952, down2=886_272, down3=3_542_016, down4=4_721_664)
    assert (p['encoder'], p['adapter'], p['interaction'], p['head']) == (9_373_824, 786_944, 3_252_224, 65)
    assert {k: rel[f'decoder.{k}'] for k in ('up4', 'up3', 'up2', 'up1')} == \
        dict(up4=3_737_631, up3=934_943, up2=234_015, up1=123_359)
    assert (rel['decoder'], p['decoder']) == (5_029_948, 4_680_828)
    assert p['poi'] == p['woi'] == 263_169
    assert rel['rec_vision'] == rel['rec_language'] == r['rec']
    assert p['text_encoder'] == 63_428_096
    t = d['totals']
    assert (t['inference_released'], t['inference']) == (18_443_005, 18_093_885)
    assert t['trainable_released'] == r['trainable']
    assert sum(d['unused_released'].values()) == r['unused'] == t['trainable_released'] - t['trainable']

@pytest.mark.parametrize('preset', list(RELEASED))
def test_macs_match_release(profiles, preset):
    m = profiles[preset]['macs']
    assert m['inference'] == 23_780_829_056
    assert m['text_encoder'] == pytest.approx(688_177_152, rel=0.005)
    assert m['train_forward'] == pytest.approx(RELEASED[preset]['train_macs'], rel=0.005)

def test_format_profile_names_both_counts(profiles):
    s = format_profile(profiles['qata'])
    assert '18,443,005' in s and '18,093,885' in s and '69,440,255' in s and '23,780,829,056' in s

def test_eval_skips_training_parts(tiny_model):
    m, te = tiny_model, tiny_model.text_encoder
    feats, mask = te.encode(['left lung', 'both lungs, two infected areas'])
    images = torch.rand(2, 3, 64, 64)
    called, handles = record_calls(m)
    with torch.no_grad(): out = m.eval()(images, feats, mask)
    assert called == [] and set(out) == {'logits', 'attn_t2v', 'attn_v2t'}
    out = m.train()(images, feats, mask)
    for h in handles: h.remove()
    assert sorted(set(called)) == sorted(TRAINING_PARTS)
    assert all(torch.isfinite(out[k]) for k in ('loss_ccl', 'loss_v2t', 'loss_t2v'))

def test_state_dict_round_trip(tiny_model, tmp_path):
    m = tiny_model.eval()
    torch.save(m.state_dict(), tmp_path / 'm.pt')
    other = RecLMIS(m.cfg, verbose=False)
    other.load_state_dict(torch.load(tmp_path / 'm.pt'))
    images, sentences = torch.rand(1, 3, 64, 64), ['upper left lung']
    assert torch.equal(m.predict(images, sentences), other.predict(images, sentences))

def test_bad_inputs(tiny_model):
    m = tiny_model.eval()
    feats, mask = m.text_encoder.encode(['left lung'])
    with pytest.raises(ValueError, match='n_patches'): m(torch.rand(1, 3, 96, 96), feats, mask)
    with pytest.raises(ValueError, match='dim=128'): m(torch.rand(1, 3, 64, 64), feats[..., :32], mask)
    with pytest.raises(ValueError, match='2 images'): m(torch.rand(2, 3, 64, 64), feats, mask)
    with pytest.raises(ValueError, match='one sentence per image'): m.predict(torch.rand(2, 3, 64, 64), ['left lung'])
    with pytest.raises(ValueError, match='needs dim=256'):
        RecLMIS(get_preset('small', dim=256, widths=(16, 32, 64, 128, 256)), text_encoder=m.text_encoder, verbose=False)
    with pytest.raises(ValueError, match='multiple of 16'): get_preset('small', image_size=100)
    with pytest.raises(ValueError, match='image_mask_rate'): get_preset('qata', image_mask_rate=0)
    with pytest.raises(ValueError, match='unknown preset'): RecLMIS('covid', verbose=False)

def test_presets_are_explicit_and_printed(capsys, tiny_model):
    RecLMIS(get_preset('mosmed', text_encoder='tiny', dim=512), text_encoder=None)
    out = capsys.readouterr().out
    assert "preset 'mosmed'" in out and '3 layers/stack' in out and 'mask rate image 0.3' in out and 'dropout 0.5' in out

def test_small_preset_with_minilm():
    "The CPU preset: real MiniLM weights (bundled in a pip package), projected to 128, frozen"
    m = RecLMIS('small', verbose=False)
    assert m.text_encoder.name == 'minilm' and m.text_encoder.dim == 128
    assert n_params(m, trainable=True) == n_params(m) - n_params(m.text_encoder)
    probs = m.predict(torch.rand(1, 3, 128, 128), ['Unilateral pulmonary infection, one infected area, lower left lung.'])
    assert probs.shape == (1, 1, 128, 128) and 0 <= probs.min() and probs.max() <= 1

def test_small_interaction_deviations(tiny_model):
    "`small` (and only it) deviates: padding masked out of the vision-to-text attention, random position start, text residual"
    assert not any(getattr(get_preset(p), k) for p in ('qata', 'mosmed') for k in ('interaction_key_mask', 'interaction_text_residual'))
    assert get_preset('qata').pos_embed_init == get_preset('mosmed').pos_embed_init == 'zeros' and tiny_model.interaction.text_residual
    assert tiny_model.interaction.pos_embed.std() > 0.01
    te = tiny_model.text_encoder
    feats, mask = te.encode(['Unilateral pulmonary infection, one infected area, lower left lung.', ''])
    with torch.no_grad(): w = tiny_model.eval()(torch.rand(2, 3, 64, 64), feats, mask)['attn_v2t']
    assert (mask == 0).any() and w.masked_select((mask == 0)[:, None].expand_as(w)).abs().max() == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
    assert 'interaction_key_mask=True' in tiny_model.summary() and 'pos_embed_init=trunc_normal' in tiny_model.summary()
